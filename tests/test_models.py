"""Tests for qseg.models: sources, backends, 4-bit, LoRA, hidden states, the GGUF cache."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from qseg.models import (
    LoraSettings,
    align_special_tokens,
    backbone_hidden_states,
    check_head_gives_the_logits,
    count_parameters,
    default_model_source,
    describe,
    gguf_cache_dir,
    load_model,
    logit_options,
    output_head,
)

CUDA = torch.cuda.is_available()
# What the transformers backend computes in: bf16 on a CUDA GPU that has it, else fp32.
COMPUTE_DTYPE = torch.bfloat16 if CUDA and torch.cuda.is_bf16_supported() else torch.float32
WORDS = "Question : Answer how many apples does Tom have ? 1 2 3 4 5 6 7 8 9 0 + - * = ####"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama and a word-level tokenizer with EOS but no pad token, saved."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(
        [WORDS], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # head_dim 16: unsloth's kernels want at least that
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _batch(tokenizer, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    texts = ["Question : how many apples does Tom have ? Answer 3 + 4 = 7", "Answer 9"]
    return tokenizer(texts, padding=True, return_tensors="pt").to(device)


def _randomize_lora_b(model) -> None:
    # peft starts lora_B at zero, which makes lora_A's gradient exactly zero on step one.
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)


def _lora_grads(loaded) -> dict[str, torch.Tensor]:
    model = loaded.model
    batch = _batch(loaded.tokenizer, model.device)
    hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    logits = hidden @ output_head(model).weight.T.to(hidden.dtype)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _load(folder: Path, **options):
    """The transformers backend, whatever is installed: these tests are about it."""
    return load_model(str(folder), **{"backend": "transformers", **options})


def test_auto_picks_backend_and_quantization_for_this_machine(tiny_folder):
    loaded = load_model(str(tiny_folder), lora=None, trainable=False)
    if CUDA:
        assert loaded.quantization == "4bit"
        assert loaded.backend in ("unsloth", "transformers")
    else:
        assert (loaded.backend, loaded.quantization, loaded.dtype) == (
            "transformers",
            "none",
            torch.float32,
        )


def test_local_folder_lora_trains_only_lora(tiny_folder):
    loaded = _load(tiny_folder, quantization="none")
    assert (loaded.backend, loaded.quantization, loaded.dtype) == (
        "transformers",
        "none",
        COMPUTE_DTYPE,
    )
    model = loaded.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert model.training
    assert model.get_base_model().model.gradient_checkpointing

    _randomize_lora_b(model)
    grads = _lora_grads(loaded)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def _check_hidden_states_give_logits(loaded) -> None:
    model = loaded.model
    _randomize_lora_b(model)  # so the LoRA path changes the result and must be included
    model.eval()
    batch = _batch(loaded.tokenizer, model.device)
    with torch.no_grad():
        hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        logits = model(**batch).logits
        with model.disable_adapter():
            no_lora = model(**batch).logits
    head = output_head(model)
    assert hidden.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    assert head.weight.shape == (model.config.vocab_size, model.config.hidden_size)
    tolerance = {} if hidden.dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    projected = hidden @ head.weight.T.to(hidden.dtype)
    torch.testing.assert_close(projected.float(), logits.float(), **tolerance)
    assert not torch.allclose(logits, no_lora)


def test_backbone_hidden_states_times_head_equals_logits(tiny_folder):
    _check_hidden_states_give_logits(_load(tiny_folder, quantization="none"))


TINY = dict(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)  # fmt: skip


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (
            lambda: Gemma2ForCausalLM(Gemma2Config(**TINY, final_logit_softcapping=1.0)),
            {"logit_softcap": 1.0},
        ),
        (
            lambda: GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0)),
            {"logit_scale": 0.25},
        ),
        (
            lambda: CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.5)),
            {"logit_scale": 0.5},
        ),
    ],
    ids=["gemma2-softcap", "granite-scaling", "cohere-scale"],
)
def test_models_that_declare_their_logit_transform_pass(make, options):
    model = make()
    assert logit_options(model.config) == options
    check_head_gives_the_logits(model)


def test_a_model_that_transforms_its_logits_undeclared_is_refused():
    model = Gemma2ForCausalLM(Gemma2Config(**TINY, final_logit_softcapping=None))

    def doubled(module, args, output):
        output.logits = output.logits * 2
        return output

    model.register_forward_hook(doubled)
    with pytest.raises(ValueError, match=r"even with the logit options its config declares"):
        check_head_gives_the_logits(model)


def test_models_whose_logits_are_the_head_of_the_hidden_states_pass(tiny_folder):
    loaded = load_model(str(tiny_folder), quantization="none", backend="transformers")
    check_head_gives_the_logits(loaded.model)  # a LoRA-wrapped Llama
    assert loaded.model.training  # its mode is restored
    uncapped = Gemma2Config(**TINY, final_logit_softcapping=None)
    check_head_gives_the_logits(Gemma2ForCausalLM(uncapped))


def test_the_logits_check_leaves_4bit_layers_trainable(tiny_folder):
    """On a CPU with AVX512-BF16 (ours has it), bitsandbytes turns a 4-bit layer's weights
    into an inference format that passes no gradient the first time it runs in eval mode
    without grad: the check must not do that. The LoRA gradients after the check equal
    those of a model never checked."""
    pytest.importorskip("bitsandbytes")
    input_ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3]])

    def lora_grads(check: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = _load(tiny_folder, quantization="4bit", lora=LoraSettings(dropout=0.0)).model
        if check:
            check_head_gives_the_logits(model)
        backbone_hidden_states(model, input_ids).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    unchecked, checked = lora_grads(False), lora_grads(True)
    assert unchecked.keys() == checked.keys() and any(g.abs().sum() > 0 for g in checked.values())
    for name, grad in unchecked.items():
        torch.testing.assert_close(checked[name], grad, msg=name)


def test_tokenizer_gets_pad_token_and_padding_side(tiny_folder):
    loaded = _load(tiny_folder, quantization="none", trainable=False, padding_side="left")
    tokenizer = loaded.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert loaded.model.config.pad_token_id == tokenizer.eos_token_id
    assert _batch(tokenizer)["attention_mask"][1, 0] == 0  # left padded


def test_tokenizer_special_tokens_follow_the_model_config(tiny_folder):
    """As done to a GGUF file's tokenizer: a wrong eos and a missing pad are set from the
    config's ids; tokens the config does not name (or names out of range) are left alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    eos, unk = tokenizer.eos_token, tokenizer.unk_token
    tokenizer.eos_token, tokenizer.pad_token = unk, None
    config = SimpleNamespace(
        bos_token_id=len(tokenizer) + 5,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        pad_token_id=tokenizer.convert_tokens_to_ids(eos),
    )
    bos = tokenizer.bos_token
    align_special_tokens(tokenizer, config)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (eos, eos, bos)
    assert tokenizer.eos_token_id == config.eos_token_id


def test_four_bit_goes_through_bitsandbytes_nf4(tiny_folder):
    import bitsandbytes as bnb

    loaded = _load(tiny_folder, quantization="4bit")
    assert (loaded.backend, loaded.quantization, loaded.dtype) == (
        "transformers",
        "4bit",
        COMPUTE_DTYPE,
    )
    base = loaded.model.get_base_model()
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7
    assert base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert base.config.quantization_config.bnb_4bit_use_double_quant

    _randomize_lora_b(loaded.model)
    grads = _lora_grads(loaded)
    assert all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)

    # packed 4-bit weights are counted at their real size
    dense = LlamaForCausalLM.from_pretrained(tiny_folder)
    info = describe(loaded)
    assert info["total_params"] == count_parameters(dense)[1] + info["trainable_params"]


def test_adapter_round_trip(tiny_folder, tmp_path):
    trained = _load(tiny_folder, quantization="none")
    _randomize_lora_b(trained.model)
    trained.model.save_pretrained(tmp_path / "adapter")

    frozen = _load(
        tiny_folder, quantization="none", adapter=str(tmp_path / "adapter"), trainable=False
    )
    assert describe(frozen)["trainable_params"] == 0
    assert not frozen.model.training
    batch = _batch(frozen.tokenizer, frozen.model.device)
    trained.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen.model(**batch).logits, trained.model(**batch).logits)

    resumed = _load(tiny_folder, quantization="none", adapter=str(tmp_path / "adapter"))
    assert describe(resumed)["trainable_params"] == describe(trained)["trainable_params"]


def test_describe_reports_how_the_model_was_loaded(tiny_folder):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    info = describe(_load(tiny_folder, quantization="none", lora=lora))
    assert info["source"] == str(tiny_folder)
    assert info["backend"] == "transformers"
    assert info["quantization"] == "none"
    assert info["dtype"] == str(COMPUTE_DTYPE).removeprefix("torch.")
    assert info["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    # q_proj (64->64) and v_proj (64->32) in 2 layers, rank 4: A is 4 x in, B is out x 4
    assert info["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert info["total_params"] > info["trainable_params"]


def test_all_linear_targets_leave_the_head_alone(tiny_folder):
    loaded = _load(tiny_folder, quantization="none", lora=LoraSettings(targets="all-linear"))
    head = output_head(loaded.model)
    assert isinstance(head, torch.nn.Linear) and not hasattr(head, "lora_A")
    assert sum("lora_A" in n for n, _ in loaded.model.named_parameters()) == 2 * 7


def test_full_fine_tuning_without_lora(tiny_folder):
    loaded = _load(tiny_folder, quantization="none", lora=None)
    trainable, total = count_parameters(loaded.model)
    assert trainable == total


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": "8bit"}, "quantization must be one of"),
        ({"backend": "vllm"}, "backend must be one of"),
        ({"padding_side": "middle"}, "padding_side must be one of"),
        ({"quantization": "4bit", "lora": None}, "cannot be trained directly"),
        ({"lora": LoraSettings(targets=("q_proj", "qq_proj"))}, r"\['qq_proj'\]"),
        ({"adapter": "/nonexistent/adapter"}, "not a peft adapter folder"),
    ],
)
def test_bad_options_are_refused(tiny_folder, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _load(tiny_folder, **kwargs)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"r": 0}, "r must be a positive"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"targets": ()}, "at least one module"),
        ({"targets": "everything"}, "'all-linear'"),
    ],
)
def test_bad_lora_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**settings)


def test_bad_model_paths_name_the_path_and_what_is_accepted(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*hub id"):
        load_model(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no-such-model-folder")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        load_model(str(empty))

    text = tmp_path / "weights.bin"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(text))

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(16))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(fake))

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(ValueError, match="several .gguf files.*a.gguf, b.gguf"):
        load_model(str(two))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_unsloth_backend_without_gpu_is_a_clear_error(tiny_folder):
    with pytest.raises(ValueError, match="'unsloth' is not available: .*CUDA GPU"):
        load_model(str(tiny_folder), backend="unsloth")


@pytest.mark.gpu
@pytest.mark.skipif(
    not (CUDA and importlib.util.find_spec("unsloth")), reason="needs a CUDA GPU and unsloth"
)
def test_unsloth_backend_trains_lora_and_gives_hidden_states(tiny_folder):
    loaded = load_model(str(tiny_folder), backend="unsloth")
    assert (loaded.backend, loaded.quantization) == ("unsloth", "4bit")
    _randomize_lora_b(loaded.model)
    grads = _lora_grads(loaded)
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    _check_hidden_states_give_logits(loaded)


def test_interrupted_gguf_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QSEG_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(gguf))
    target = gguf_cache_dir(gguf)
    assert target.parent == tmp_path / "cache" / "gguf"
    assert list(target.parent.iterdir()) == []


def test_gguf_cache_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QSEG_CACHE", str(tmp_path))
    gguf = tmp_path / "SmolThing.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    first = gguf_cache_dir(gguf)
    assert first.name.startswith("SmolThing-20-")
    assert gguf_cache_dir(gguf) == first
    os.utime(gguf, ns=(0, gguf.stat().st_mtime_ns + 10**9))
    assert gguf_cache_dir(gguf) != first


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_then_read_from_cache(tmp_path, monkeypatch):
    try:
        gguf = Path(default_model_source())
    except FileNotFoundError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("QSEG_CACHE", str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])

    first = load_model(str(gguf), quantization="none", lora=None, trainable=False)
    assert first.converted
    assert Path(first.gguf_cache).parent == tmp_path / "gguf"
    assert first.model.config.vocab_size == len(first.tokenizer) == 49152
    # the file names <|im_end|> (id 2) as eos and pad; some transformers releases misread it
    config, tokenizer = first.model.config, first.tokenizer
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config.eos_token_id == 2
    with torch.no_grad():
        expected = first.model(input_ids=ids).logits
    del first

    start = time.perf_counter()
    # the folder holding the .gguf resolves to the same file, hence the same cache
    second = load_model(str(gguf.parent), quantization="none", lora=None, trainable=False)
    seconds = time.perf_counter() - start
    assert not second.converted
    assert second.gguf_cache == str(gguf_cache_dir(gguf))
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [Path(second.gguf_cache).name]
    assert seconds < 15, f"loading the cached conversion took {seconds:.1f} s"
    with torch.no_grad():
        torch.testing.assert_close(second.model(input_ids=ids).logits, expected)
