"""An external reward model: a local ``AutoModelForSequenceClassification`` directory, frozen, as a reward function.

Each (prompt, response) is rendered through the classifier tokenizer's chat template as a user turn and an assistant
turn when it has one, else as ``prompt + "\\n" + response``; the reward is the logit of ``label``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class ClassifierReward:
    name = "classifier"
    columns = ()

    def __init__(self, path: str, label: int = 0, batch_size: int = 16, max_length: int = 1024,
                 device: str = "cpu") -> None:
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ValueError(f"path={path!r}: not a local transformers model directory (no config.json)")
        self.path, self.label, self.batch_size, self.max_length = str(Path(path).expanduser()), label, batch_size, max_length
        self.device = torch.device(device)
        self._model = self._tokenizer = None

    def _load(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        from align.models.loading import check_loading_info

        model, info = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32,
                                                                         output_loading_info=True)
        check_loading_info(self.path, info, key="classifier path")  # a classifier without its trained score head scores at random
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the classifier reads the last non-pad token of each row
            model.config.pad_token_id = tokenizer.pad_token_id
        if not 0 <= self.label < model.config.num_labels:
            raise ValueError(f"label={self.label}: {self.path} has {model.config.num_labels} label(s)")
        self._model, self._tokenizer = model.requires_grad_(False).eval().to(self.device), tokenizer

    def render(self, prompt: str, response: str) -> str:
        tok = self._tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": response}], tokenize=False)
        return f"{prompt}\n{response}"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if self._model is None:
            self._load()
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [self.render(p, r) for p, r in zip(prompts[start:start + self.batch_size],
                                                       responses[start:start + self.batch_size])]
            batch = self._tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.max_length, add_special_tokens=not self._tokenizer.chat_template)
            logits = self._model(**batch.to(self.device)).logits
            scores.append(logits[:, self.label].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)
