import torch
from peft import PeftModel

from lorahpo.config import ExperimentConfig, apply_overrides
from lorahpo.data import TaskData, make_loader
from lorahpo.model import build_base, build_classifier, lora_layers
from lorahpo.repro import seed_everything_everywhere


def _model(cfg: ExperimentConfig, data: TaskData):
    seed_everything_everywhere(cfg.seed)
    return build_classifier(cfg, data.num_labels, data.tokenizer.pad_token_id)


def test_lora_on_last_n_layers_only(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    cfg = apply_overrides(tiny_cfg, {"model.num_layers": 4, "lora.last_n": 3})
    model = _model(cfg, tiny_data)
    names = lora_layers(model)
    assert len(names) == 4 * 3
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names})
    assert layers == [1, 2, 3]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)  # the head is trained


def test_seed_before_build_makes_init_identical(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    a = _model(tiny_cfg, tiny_data).state_dict()
    torch.rand(100)  # an earlier "trial" consuming RNG must not matter
    b = _model(tiny_cfg, tiny_data).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_identical_logits(tmp_path, tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    model = _model(tiny_cfg, tiny_data)
    with torch.no_grad():  # make the adapter and head non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    batch = next(iter(make_loader(tiny_data.val, tiny_data.tokenizer, 8, 0, shuffle=False)))
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path)
    assert not any(f.name.startswith("model") for f in tmp_path.iterdir())  # adapter + head only, no base weights
    base = build_base(tiny_cfg.model, tiny_data.num_labels, tiny_data.tokenizer.pad_token_id)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        after = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_padded_batch_matches_single_examples(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    model = _model(tiny_cfg, tiny_data).eval()
    ids = [tiny_data.val.input_ids[i] for i in range(6)]
    assert len({len(t) for t in ids}) > 1
    batch = tiny_data.tokenizer.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([t])).logits for t in ids])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_pad_token_set_on_model_and_tokenizer(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    model = _model(tiny_cfg, tiny_data)
    assert tiny_data.tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tiny_data.tokenizer.pad_token_id
