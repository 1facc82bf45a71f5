"""The classifier a trial trains: the base decoder with a fresh `score` head, LoRA on the last N layers (checked:
count and placement of every injected module); and the two halves of its forward pass the prefix cache splits it into
(`frozen_states`: the frozen layers below a cut, once per sweep; `upper_logits`: the layers from the cut up, per
trial), built from transformers' own mask and rotary functions so that they add up to the full model's forward."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification
from transformers.masking_utils import create_causal_mask

from lorahpo.config import ExperimentConfig, ModelConfig
from lorahpo.sources import DTYPES, TINY, from_pretrained, tiny_config

log = logging.getLogger(__name__)
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def build_base(cfg: ModelConfig, num_labels: int, pad_token_id: int) -> torch.nn.Module:
    """Base sequence classifier (decoder + fresh `score` head). Seed BEFORE calling: the head's init draws from it."""
    if cfg.name == TINY:
        mc = tiny_config(pad_token_id, cfg.num_layers)
        mc.num_labels = num_labels
        # The "pretrained" weights of the tiny model are a fixed random draw, independent of the trial seed; only the
        # head (and LoRA) are drawn from the trial's RNG, as with a real base model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForSequenceClassification(mc)
        torch.nn.init.normal_(model.score.weight, std=mc.initializer_range)
        return model.to(DTYPES[cfg.dtype])
    kwargs = {} if cfg.num_layers is None else {"num_hidden_layers": cfg.num_layers}
    model, info = from_pretrained(
        cfg,
        AutoModelForSequenceClassification.from_pretrained,
        num_labels=num_labels,
        dtype=DTYPES[cfg.dtype],
        pad_token_id=pad_token_id,
        output_loading_info=True,
        **kwargs,
    )
    odd = unexpected_load(info, model.config.num_hidden_layers)
    if odd:  # transformers' own report is silenced (sources.from_pretrained): what is NOT expected is said here
        log.warning("model %s: the load left %d weights unexpected or missing: %s", cfg.name, len(odd), odd[:5])
    model.config.pad_token_id = pad_token_id  # Llama pools the last non-pad token: it must know which one is pad
    return model


def unexpected_load(info: dict[str, Any], kept_layers: int) -> list[str]:
    """The keys of a load report that are NOT expected. Expected: the decoder layers cut off by `model.num_layers`
    and a causal LM's `lm_head` (unused by a classifier), and the new `score` head (missing: trained here)."""

    def cut(key: str) -> bool:
        m = LAYER.search(key)
        return key.startswith("lm_head.") or (m is not None and int(m.group(1)) >= kept_layers)

    odd = sorted(k for k in info.get("unexpected_keys", ()) if not cut(k))
    odd += sorted(k for k in info.get("missing_keys", ()) if not k.startswith("score."))
    return odd + sorted(str(k[0]) for k in info.get("mismatched_keys", ()))


def lora_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def add_lora(base: torch.nn.Module, cfg: ExperimentConfig) -> PeftModel:
    """LoRA on `lora.target_modules` of the last `lora.last_n` layers; the `score` head trained and saved with it.
    (`lora.last_n` against the layer count is a user error caught by checks.check_model_fit before any trial.)"""
    n_layers = base.config.num_hidden_layers
    layers = list(range(n_layers - cfg.lora.last_n, n_layers))
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers",
        modules_to_save=["score"],
    )
    with warnings.catch_warnings():  # peft probes a property transformers 5 deprecates (FutureWarning), per model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, peft_cfg)
    injected = lora_layers(model)
    expected = len(cfg.lora.target_modules) * cfg.lora.last_n
    # layers_to_transform silently matches nothing when a pattern is off: check count AND placement.
    wrong = [n for n in injected if not any(f".layers.{i}." in n for i in layers)]
    if len(injected) != expected or wrong:
        raise RuntimeError(
            f"LoRA landed on {len(injected)} modules ({wrong or injected[:4]}...), expected {expected} "
            f"on layers {layers}; check lora.target_modules against the model's module names"
        )
    return model


def build_classifier(cfg: ExperimentConfig, num_labels: int, pad_token_id: int) -> PeftModel:
    """Base + LoRA, ready to train. Call after seeding."""
    return add_lora(build_base(cfg.model, num_labels, pad_token_id), cfg)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------------------
# The forward pass in two halves (the prefix cache). LlamaModel.forward, without a KV cache, is: embed -> position ids
# 0..T-1 (the same for every row: padding is on the right) -> causal + padding mask and rotary embeddings, computed
# once -> every decoder layer -> norm; the classification head then pools the last non-pad token. The two functions
# below run that sequence split at a layer index `cut` (the input of layer `cut`, i.e. the output of layer cut-1).


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The LlamaModel inside a bare classifier or a peft-wrapped one."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.model


def _layer_inputs(decoder: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """What LlamaModel.forward hands every decoder layer: position ids, rotary embeddings, the attention mask."""
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(decoder.config, hidden, attention_mask, cache=None, position_ids=position_ids)
    rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
    return {"attention_mask": mask, "position_ids": position_ids, "position_embeddings": rotary}


@torch.no_grad()
def frozen_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cuts: list[int]
) -> dict[int, torch.Tensor]:
    """Hidden states entering layer `c` for every c in `cuts` (0: the embeddings), for a right-padded batch."""
    decoder = _decoder(model)
    hidden = decoder.embed_tokens(input_ids)
    inputs = _layer_inputs(decoder, hidden, attention_mask)
    out = {0: hidden} if 0 in cuts else {}
    for i, layer in enumerate(decoder.layers[: max(cuts)]):
        hidden = layer(hidden, **inputs)
        if i + 1 in cuts:
            out[i + 1] = hidden
    return out


def first_lora_layer(model: PeftModel) -> int:
    """The lowest decoder layer that carries LoRA (the layers below it are frozen)."""
    return min(model.peft_config[model.active_adapter].layers_to_transform)


def upper_logits(
    model: PeftModel, states: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor, cut: int
) -> torch.Tensor:
    """Logits of the classifier from the hidden states entering layer `cut` (right-padded like `input_ids`): layers
    cut..L-1, the final norm, the `score` head, pooled at the last non-pad token exactly as
    LlamaForSequenceClassification does. Layers below the first LoRA layer run without gradients."""
    decoder = _decoder(model)
    inputs = _layer_inputs(decoder, states, attention_mask)
    trained_from = first_lora_layer(model)
    hidden = states
    for i in range(cut, len(decoder.layers)):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= trained_from):
            hidden = decoder.layers[i](hidden, **inputs)
    logits = model.get_base_model().score(decoder.norm(hidden))
    # GenericForSequenceClassification's pooling: the rightmost token that is not the pad token
    non_pad = (input_ids != decoder.config.pad_token_id).to(logits.device, torch.int32)
    last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
    return logits[torch.arange(len(logits), device=logits.device), last]
