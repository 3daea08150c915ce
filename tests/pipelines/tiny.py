"""Overrides that shrink the embedded task to seconds: a ~80k-parameter base (built once per ALIGN_CACHE), a few
hundred rows, a handful of steps per stage, one DPO round (the default's iterative rounds have their own tests in
test_iterative_dpo.py)."""

TINY = (
    "model.embedded.steps=30 model.embedded.hidden_size=64 model.embedded.intermediate_size=128 "
    "model.embedded.num_layers=2 data.embedded.n_pretrain=2000 data.embedded.n_pretrain_eval=100 "
    "data.embedded.n_sft=300 data.embedded.n_preferences=400 data.embedded.n_preferences_eval=50 "
    "data.embedded.n_prompts=64 data.embedded.n_eval_prompts=16 data.sft_eval_rows=32 data.rm_eval_rows=50 "
    "trainer.sft.max_steps=6 trainer.sft.save_every=3 trainer.sft.micro_batch_size=8 trainer.rm.max_steps=6 "
    "trainer.rm.micro_batch_size=8 trainer.dpo.max_steps=6 trainer.dpo.save_every=3 trainer.dpo.micro_batch_size=8 "
    "trainer.dpo.pair_prompts=32 trainer.dpo.rounds=1 trainer.ppo.max_steps=2 trainer.ppo.rollout.prompts_per_step=8 "
    "trainer.grpo.max_steps=2 trainer.grpo.rollout.prompts_per_step=4 eval.prompts=16 eval.max_new_tokens=24 "
    "resources.num_cpus=1"
).split()
