"""A job's prompts as token ids: chat messages through the model's chat template, completions as text, synthetic
prompts as given.
"""

from __future__ import annotations

from pathlib import Path

from kubeflash_api import JobSpec, SpecError


def load_tokenizer(model_dir: Path, manifest):
    if not manifest.tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(model_dir) / manifest.tokenizer))


def tokenize(spec: JobSpec, tokenizer) -> list[list[int]]:
    out = []
    for p in spec.input.prompts:
        if p.token_ids is not None:
            out.append(list(p.token_ids))
        elif tokenizer is None:
            raise SpecError(f"spec.input: prompt {p.id!r} is text but model {spec.model.uri} has no tokenizer "
                            f"(dummy models take spec.input.synthetic)")
        elif p.messages is not None and getattr(tokenizer, "chat_template", None):
            out.append(list(tokenizer.apply_chat_template(list(p.messages), tokenize=True, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"]))
        else:
            text = p.text if p.text is not None else "\n".join(m["content"] for m in p.messages)
            out.append(tokenizer(text)["input_ids"])
    return out
