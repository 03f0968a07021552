"""PEFT's own routes on the project's model take the project's checks (installed by ``import finetune``).

- ``PeftModel.from_pretrained`` (and so ``AutoPeftModelForCausalLM.from_pretrained``) on a QWenLMHeadModel checks the
  adapter exactly as ``finetune.adapters.load_adapter`` does before PEFT reads it: the base's fingerprint, every
  tensor's shape from the file header, dtypes and finite values; trained biases saved under PEFT 0.5's names are
  loaded too (PEFT itself skips them). ``PeftModel.load_adapter`` (a further adapter on such a model) does the same.
- ``PeftModel.save_pretrained`` of such a model records the base's absolute path (PEFT writes the path as typed) and
  writes base_model.json (path + fingerprint, see adapters.py).
- ``merge_and_unload`` on a model with GPTQ layers returns a float model: the merged layers and every GPTQ layer
  the adapter did not touch are dequantized into one float dtype and quantization_config is dropped, so
  ``save_pretrained`` writes a float model dir that loads (without this, float weights were saved under a config
  that still declared GPTQ).
"""

from __future__ import annotations

import contextvars
import time
from pathlib import Path

import torch

from .file_modes import weights_readable

_installed = False
# (adapter dir, its checked tensors) while from_pretrained, which checks before PEFT builds anything, runs PEFT's own
# load_adapter: that one need not read and check the file again
_checked: contextvars.ContextVar = contextvars.ContextVar("finetune_checked_adapter", default=None)


def _project_model(model) -> bool:
    from .modeling import QWenLMHeadModel

    return isinstance(model, QWenLMHeadModel)


def _local_base(model) -> Path | None:
    p = getattr(model, "name_or_path", None)
    return Path(p) if p and (Path(p) / "config.json").is_file() else None


def install() -> None:
    """Wrap the four PEFT entry points (idempotent)."""
    global _installed
    if _installed:
        return
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter
    original_save = PeftModel.save_pretrained
    original_merge = LoraModel.merge_and_unload

    def from_pretrained(cls, model, model_id, *args, **kwargs):
        from .quant.peft_lora import loading_adapter

        with loading_adapter():  # (the adapter PEFT builds gets the saved weights: its init need not be run)
            return checked_from_pretrained(cls, model, model_id, *args, **kwargs)

    def checked_from_pretrained(cls, model, model_id, *args, **kwargs):
        from .adapters import check_base, checked_weights, is_adapter_dir, use_adapter_generation_config

        if not (_project_model(model) and is_adapter_dir(model_id)):
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        from .loading import check_side_files

        check_side_files(Path(model_id))  # (its generation_config.json becomes the model's below, as in load_model)
        base = _local_base(model)
        if base is not None:
            check_base(model_id, base, explicit=True)
        sd = checked_weights(model, Path(model_id))
        use_adapter_generation_config(model, model_id)  # (as load_model does: chat reads it)
        token = _checked.set((str(model_id), sd))
        try:
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        finally:
            _checked.reset(token)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        from .quant.peft_lora import loading_adapter

        with loading_adapter():
            return checked_load_adapter(self, model_id, adapter_name, *args, **kwargs)

    def checked_load_adapter(self, model_id, adapter_name, *args, **kwargs):
        from .adapters import AdapterError, check_model_base, checked_weights, is_adapter_dir

        if not (_project_model(self.get_base_model()) and is_adapter_dir(model_id)):
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        checked = _checked.get()
        if checked is not None and checked[0] == str(model_id):
            sd = checked[1]
        elif adapter_name in self.peft_config:
            # new weights for an adapter already built (the Trainer resuming a checkpoint, which the run's own checks
            # took): its config is not this dir's, so PEFT's load as it is
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        else:  # a further adapter: the checks finetune.adapters.load_adapter runs, before PEFT adds anything
            check_model_base(self, model_id)
            sd = checked_weights(self, Path(model_id))
        result = original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        # trained biases under their legacy names (PEFT 0.5/0.6), which PEFT itself would leave out unseen
        biases = {k: v for k, v in sd.items() if k.endswith(".bias")}
        if biases:
            with torch.no_grad():
                loaded = self.load_state_dict(biases, strict=False)
            if loaded.unexpected_keys:  # check_adapter placed every key: a bias with no home is a bug here
                raise AdapterError(f"adapter {model_id}: bias {loaded.unexpected_keys[0]!r} has no place in the model")
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        from .adapters import record_base

        base_model = self.get_base_model()
        base = _local_base(base_model) if _project_model(base_model) else None
        if base is not None:
            for config in self.peft_config.values():
                if config.base_model_name_or_path and Path(config.base_model_name_or_path) == base:
                    config.base_model_name_or_path = str(base.resolve())
        if "save_embedding_layers" not in kwargs and not any(
                p.requires_grad for n, p in self.named_parameters() if n.endswith(".base_layer.weight")):
            # a LoRA on lm_head or wte made PEFT ("auto") save a whole copy of that frozen base weight, which no
            # loader of this project takes (the adapter was then refused as not fitting the model)
            kwargs["save_embedding_layers"] = False
        since = time.time()
        original_save(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            weights_readable(save_directory, since)  # (safetensors wrote adapter_model.safetensors owner-only)
        if base is not None and kwargs.get("is_main_process", True):
            record_base(save_directory, base)

    def merge_and_unload(self, *args, **kwargs):
        from .quant.linear import GPTQLinear
        from .quant.peft_lora import GPTQLoraLinear, dequantize_model

        packed = [m for m in self.model.modules() if isinstance(m, (GPTQLinear, GPTQLoraLinear))]
        if not packed:
            return original_merge(self, *args, **kwargs)
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        dtype = emb.weight.dtype if emb is not None and emb.weight.is_floating_point() else None
        for m in packed:
            if isinstance(m, GPTQLoraLinear) and m.merge_dtype is None and dtype is not None:
                m.merge_dtype = dtype
        model = original_merge(self, *args, **kwargs)
        dequantize_model(model, dtype or torch.float32)
        return model

    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftModel.save_pretrained = save_pretrained
    LoraModel.merge_and_unload = merge_and_unload
    _installed = True


__all__ = ["install"]
