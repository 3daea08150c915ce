"""A one-minute tour of the adapter engine on CPU, with nothing downloaded.

One frozen tiny Llama; two LoRA adapters taught opposite skills ("count up": next token = token + 1, and
"count down": token - 1); the same base answers differently depending on which adapter is switched on; both are
saved in PEFT's format and reloaded bit-identically. Usage: python scripts/demo_adapters.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from tqdm import tqdm

from align.adapters import AdapterModel, LoraConfig
from align.models import tiny_llama

VOCAB = 64


def counting_batch(step: int, direction: int, batch: int = 32, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(VOCAB // 4, 3 * VOCAB // 4, (batch, 1), generator=gen)
    return (start + direction * torch.arange(length)).clamp(3, VOCAB - 1)


def teach(model: AdapterModel, name: str, direction: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.adapter_parameters(name), lr=3e-3)
    model.train()
    with model.use(name), tqdm(range(steps), desc=f"training {name!r}", leave=False) as bar:
        for step in bar:
            ids = counting_batch(step, direction)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


@torch.no_grad()
def continue_from(model: AdapterModel, name: str | None, prompt: list[int], n: int = 6) -> list[int]:
    ids = torch.tensor([prompt])
    with model.use(name):
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=None, help="where to save the adapters (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = AdapterModel(tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=128))
    model.add_adapter("count_up", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.add_adapter("count_down", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
    print(model.parameter_report(), "(two adapters, one base)")

    for name, direction in (("count_up", 1), ("count_down", -1)):
        print(f"{name}: final loss {teach(model, name, direction, args.steps):.3f}")

    prompt = [30, 31, 32]
    print(f"prompt {prompt}")
    for name in (None, "count_up", "count_down"):
        print(f"  {name or 'bare base':>10} -> {continue_from(model, name, prompt)}")

    out = args.out or tempfile.mkdtemp(prefix="align-demo-")
    for name in model.adapter_names:
        model.save_adapter(name, f"{out}/{name}")
    fresh = AdapterModel(tiny_llama(vocab_size=VOCAB, hidden_size=64, intermediate_size=128))
    for name in model.adapter_names:
        fresh.load_adapter(f"{out}/{name}", name)
    ids = counting_batch(999, 1)
    for name in model.adapter_names:
        with model.use(name), fresh.use(name):
            same = torch.equal(model(ids).logits, fresh(ids).logits)
        print(f"saved {name!r} to {out}/{name} (PEFT format); reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
