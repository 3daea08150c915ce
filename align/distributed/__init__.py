"""Training on several processes. ``deepspeed``: the DeepSpeed back-end of the shared loop (ZeRO-2/3, CPU offload)
and a ZeRO-3-safe adapter save; ``ds_config``: DeepSpeed JSON configs filled from align's trainer config.

Importing this package loads nothing heavy; ``align.distributed.deepspeed`` imports deepspeed.
"""
