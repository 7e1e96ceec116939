"""Lean Qwen3/Gemma3 encoders against transformers' own models, on tiny random checkpoints.

The torch reference attention path runs the whole-model comparisons (BIDIRLM_KERNELS=torch; the
Triton interpreter is too slow for whole models); one small case runs through the interpreter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bidirlm.runtime.models import (
    CheckpointError,
    Encoder,
    SequenceClassifier,
    TokenClassifier,
    load_model,
    pool,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "bidirectional encoders read the whole sentence at once",
    "a causal language model only looks at the past tokens",
    "packing sequences avoids wasting compute on padding",
    "sliding window attention keeps only nearby keys",
    "hello world, this is a tiny tokenizer for tests",
    "mean pooling averages the hidden states of a sentence",
]

_COMMON = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_attention_heads=4)
CONFIGS = {
    # GQA (4 q heads / 2 kv heads), untied head, default RoPE
    "qwen3-gqa": dict(
        _COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False
    ),
    # MQA, tied head, attention biases, YaRN RoPE, a sliding-window layer (window 4)
    "qwen3-mqa": dict(
        _COMMON,
        num_hidden_layers=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 1e6,
        },
    ),
    # sliding + full layers with a window (5 -> +/- 2 bidirectional, 4 back causal) smaller than
    # the sequences, local/global RoPE bases with linear scaling on the global layers, final
    # logit soft-capping, query_pre_attn_scalar != head_dim
    "gemma3": dict(
        _COMMON,
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        query_pre_attn_scalar=24,
        final_logit_softcapping=30.0,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}
KINDS = tuple(CONFIGS)
ATOL = 2e-5  # float32 end to end; observed max |diff| ~3e-6


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS (no download), with a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _hf_classes(kind: str):
    if kind.startswith("qwen3"):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config, Qwen3ForCausalLM
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3TextConfig, Gemma3ForCausalLM


def build_checkpoint(kind: str, folder: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    """A random `*ForCausalLM` checkpoint of CONFIGS[kind] (norm weights perturbed from init)."""
    config_cls, model_cls = _hf_classes(kind)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**CONFIGS[kind]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def hf_reference(kind: str, folder: Path, *, bidirectional: bool):
    """transformers' own model for the checkpoint, bidirectional the way transformers does it."""
    config_cls, model_cls = _hf_classes(kind)
    raw = json.loads((folder / "config.json").read_text())
    if kind.startswith("qwen3"):
        raw["is_causal"] = not bidirectional
    else:
        raw["use_bidirectional_attention"] = bidirectional
    config = config_cls.from_dict(raw)
    return model_cls.from_pretrained(folder, config=config).eval()


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {kind: build_checkpoint(kind, root / kind) for kind in KINDS}


def batch(seed: int = 1, lengths: tuple[int, ...] = (13, 9, 4, 11)):
    """Right-padded ids/mask [B, S] plus the packed view (ids [T], cu_seqlens int32)."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(4, 500, (len(lengths), s), generator=g)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return ids, mask, ids[mask.bool()], cu


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_transformers_padded_and_packed(ckpts, kind: str, bidirectional: bool) -> None:
    enc = load_model(ckpts[kind], bidirectional=bidirectional)
    ref_model = hf_reference(kind, ckpts[kind], bidirectional=bidirectional)
    ids, mask, flat, cu = batch()
    with torch.no_grad():
        ref = ref_model.model(ids, attention_mask=mask).last_hidden_state
        ref_logits = ref_model(ids, attention_mask=mask).logits
        padded = enc(ids, attention_mask=mask)
        packed = enc(flat, cu_seqlens=cu, max_seqlen=13)
    real = mask.bool()
    assert padded.shape == (4, 13, 64) and packed.shape == (int(cu[-1]), 64)
    torch.testing.assert_close(padded[real], ref[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(packed, ref[real], rtol=0, atol=ATOL)
    # the LM head the MNTP loss uses: logits = softcap(hidden @ W.T)
    logits = packed @ enc.lm_head_weight.T
    cap = enc.final_logit_softcap
    assert cap == CONFIGS[kind].get("final_logit_softcapping")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(logits, ref_logits[real], rtol=0, atol=1e-4)
    tied = CONFIGS[kind].get("tie_word_embeddings", kind == "gemma3")
    assert (enc.lm_head_weight.data_ptr() == enc.embed.weight.data_ptr()) == tied


def test_left_padding_and_position_ids_follow_transformers(ckpts) -> None:
    """Padded rows use positions 0..S-1 like transformers; explicit positions re-align them."""
    enc = load_model(ckpts["gemma3"])
    ref_model = hf_reference("gemma3", ckpts["gemma3"], bidirectional=True)
    ids, mask, _, _ = batch(lengths=(10, 6))
    left_ids = torch.stack([ids[0, :10], torch.cat([ids[1, :4], ids[1, :6]])])
    left_mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    with torch.no_grad():
        ref = ref_model.model(left_ids, attention_mask=left_mask).last_hidden_state
        out = enc(left_ids, attention_mask=left_mask)
        real = left_mask.bool()
        torch.testing.assert_close(out[real], ref[real], rtol=0, atol=ATOL)
        positions = (left_mask.cumsum(1) - 1).clamp(min=0)
        shifted = enc(left_ids, attention_mask=left_mask, position_ids=positions)
        alone = enc(ids[1:, :6])
    torch.testing.assert_close(shifted[1, 4:], alone[0], rtol=0, atol=ATOL)


def test_triton_interpreter_path_matches_torch(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """One small packed batch through the Triton kernel (interpreter on CPU) vs the torch path."""
    enc = load_model(ckpts["gemma3"])
    _, _, flat, cu = batch(lengths=(7, 3))
    with torch.no_grad():
        expected = enc(flat, cu_seqlens=cu)
        monkeypatch.setenv("BIDIRLM_KERNELS", "auto")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        got = enc(flat, cu_seqlens=cu)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_direction_is_settable(ckpts) -> None:
    enc = load_model(ckpts["qwen3-gqa"], bidirectional=False)
    ids = batch()[0][:1]
    with torch.no_grad():
        causal = enc(ids)
        assert torch.allclose(causal[:, :5], enc(ids[:, :5]), atol=ATOL)  # prefix ignores future
        enc.bidirectional = True
        bidir = enc(ids)
    assert not torch.allclose(bidir[:, :5], causal[:, :5], atol=1e-3)
    assert not torch.allclose(bidir[:, :5], enc(ids[:, :5]), atol=1e-3)  # now sees the future


@pytest.mark.parametrize("kind", ["qwen3-gqa", "gemma3"])
def test_save_pretrained_round_trips_through_transformers(ckpts, tmp_path: Path, kind: str) -> None:
    enc = load_model(ckpts[kind])
    out = tmp_path / "saved"
    enc.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    if kind.startswith("qwen3"):
        assert raw["is_causal"] is False and raw["architectures"] == ["Qwen3ForCausalLM"]
    else:
        assert raw["use_bidirectional_attention"] is True
        assert raw["sliding_window"] == 5 and raw["model_type"] == "gemma3_text"
    assert (out / "tokenizer.json").is_file()
    _, model_cls = _hf_classes(kind)
    theirs = model_cls.from_pretrained(out).eval()  # bidirectional from config.json alone
    again = load_model(out)
    assert again.tokenizer is not None and again.bidirectional
    ids, mask, flat, cu = batch(seed=3)
    with torch.no_grad():
        ref = theirs.model(ids, attention_mask=mask).last_hidden_state[mask.bool()]
        torch.testing.assert_close(enc(flat, cu_seqlens=cu), ref, rtol=0, atol=ATOL)
    for name, tensor in enc.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    enc.bidirectional = False
    enc.save_pretrained(tmp_path / "causal")
    raw = json.loads((tmp_path / "causal" / "config.json").read_text())
    assert not raw.get("use_bidirectional_attention", False) and raw.get("is_causal", True)
    assert not load_model(tmp_path / "causal", bidirectional=None).bidirectional
    assert load_model(out, bidirectional=None).bidirectional  # None follows config.json


def test_sharded_save_and_load(ckpts, tmp_path: Path) -> None:
    enc = load_model(ckpts["qwen3-gqa"])
    enc.save_pretrained(tmp_path, max_shard_size=60_000)  # ~200 KB of float32 -> several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    again = load_model(tmp_path, dtype=torch.float32)
    from transformers import Qwen3ForCausalLM

    theirs = Qwen3ForCausalLM.from_pretrained(tmp_path)
    ours = dict(theirs.named_parameters())
    torch.testing.assert_close(ours["lm_head.weight"], again.lm_head_weight)
    ids = batch()[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(again(ids), enc(ids))


def test_bare_model_and_multimodal_prefixes(ckpts, tmp_path: Path) -> None:
    """`*Model` (no prefix, no head) and multimodal text parts load through the prefix map."""
    ids = batch()[0][:2]
    # Qwen3Model layout: tensors without the `model.` prefix and no lm_head
    src = load_file(str(ckpts["qwen3-gqa"] / "model.safetensors"))
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(
        {k.removeprefix("model."): v for k, v in src.items() if k != "lm_head.weight"},
        str(bare / "model.safetensors"),
    )
    raw = json.loads((ckpts["qwen3-gqa"] / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**raw, "architectures": ["Qwen3Model"]}))
    enc = load_model(bare)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), load_model(ckpts["qwen3-gqa"])(ids))
    with pytest.raises(RuntimeError, match="no LM head"):
        enc.lm_head_weight  # noqa: B018
    assert enc.tokenizer is None
    # Gemma3ForConditionalGeneration: text under model.language_model. (5.x) or
    # language_model.model. (4.x), vision tensors ignored, config in text_config
    text = load_file(str(ckpts["gemma3"] / "model.safetensors"))
    text_raw = json.loads((ckpts["gemma3"] / "config.json").read_text())
    expected = load_model(ckpts["gemma3"])
    for prefix in ("model.language_model.", "language_model.model."):
        mm = tmp_path / prefix.replace(".", "_")
        mm.mkdir()
        tensors = {prefix + k.removeprefix("model."): v for k, v in text.items()}
        tensors["model.vision_tower.patch.weight"] = torch.zeros(3, 3)
        save_file(tensors, str(mm / "model.safetensors"))
        config = {
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": {**text_raw, "model_type": "gemma3_text"},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16},
        }
        (mm / "config.json").write_text(json.dumps(config))
        enc = load_model(mm)
        with torch.no_grad():
            torch.testing.assert_close(enc(ids), expected(ids), rtol=0, atol=0)
        enc.save_pretrained(mm / "out")
        assert json.loads((mm / "out" / "config.json").read_text())["model_type"] == "gemma3_text"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_errors_name_the_problem(ckpts, tmp_path: Path) -> None:
    src = ckpts["qwen3-gqa"]
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["X"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture.*Qwen3ForCausalLM.*Gemma3"):
        load_model(empty)
    (empty / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model weights"):
        load_model(empty)
    tensors = load_file(str(src / "model.safetensors"))
    broken = _copy(src, tmp_path / "missing")
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
        str(broken / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.1\.mlp\.w_up\.weight"):
        load_model(broken)
    broken = _copy(src, tmp_path / "shape")
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(bad, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \(16, 64\), expected"):
        load_model(broken)
    broken = _copy(src, tmp_path / "extra")
    save_file(
        {**tensors, "model.layers.7.mlp.up_proj.weight": torch.zeros(2)},
        str(broken / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*layers\.7"):
        load_model(broken)
    with pytest.raises(ValueError, match="dtype"):
        load_model(src, dtype=torch.int32)


def test_forward_argument_errors(ckpts) -> None:
    enc = load_model(ckpts["qwen3-mqa"])
    ids, mask, flat, cu = batch()
    with pytest.raises(ValueError, match="attention_mask"):
        enc(flat, cu_seqlens=cu, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input_ids: packed"):
        enc(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens: expected int32"):
        enc(flat, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"input_ids: padded"):
        enc(flat)
    with pytest.raises(ValueError, match="attention_mask: shape"):
        enc(ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="position_ids"):
        enc(flat, cu_seqlens=cu, position_ids=torch.arange(3))


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_pool_packed_equals_padded(pooling: str) -> None:
    lengths = (5, 2, 7)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 8, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    packed = pool(hidden[mask.bool()], pooling=pooling, cu_seqlens=cu)
    padded = pool(hidden, pooling=pooling, attention_mask=mask)
    rows = [hidden[i, :n] for i, n in enumerate(lengths)]
    expected = {
        "mean": torch.stack([r.mean(0) for r in rows]),
        "first": torch.stack([r[0] for r in rows]),
        "last": torch.stack([r[-1] for r in rows]),
    }[pooling]
    torch.testing.assert_close(packed, expected)
    torch.testing.assert_close(padded, expected)
    # left padding: the same real tokens shifted right
    left = torch.zeros_like(hidden)
    left_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths):
        left[i, 7 - n :] = hidden[i, :n]
        left_mask[i, 7 - n :] = 1
    torch.testing.assert_close(pool(left, pooling=pooling, attention_mask=left_mask), expected)


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(2, 3, 4), pooling="max")
    with pytest.raises(ValueError, match="hidden"):
        pool(
            torch.zeros(2, 3, 4), pooling="mean", cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="attention_mask"):
        pool(torch.zeros(2, 3, 4), pooling="mean", attention_mask=torch.ones(2, 4))


def test_encode_sorts_packs_and_restores_order(ckpts) -> None:
    enc = load_model(ckpts["gemma3"])
    texts = [CORPUS[3], "hi", CORPUS[0], CORPUS[6][:20], CORPUS[1]]
    got = enc.encode(texts, batch_size=2, pooling="mean")
    assert got.dtype == torch.float32 and got.shape == (5, 64)
    tok = enc.tokenizer
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = torch.tensor([tok(text)["input_ids"]])
            torch.testing.assert_close(got[i], enc(ids)[0].mean(0), rtol=0, atol=ATOL)
    last = enc.encode(texts, batch_size=8, pooling="last", normalize=True)
    torch.testing.assert_close(last.norm(dim=-1), torch.ones(5))
    first = enc.encode(texts[:1], pooling="first", max_length=3)
    with torch.no_grad():
        ids = torch.tensor([tok(texts[0])["input_ids"][:3]])
        torch.testing.assert_close(first[0], enc(ids)[0, 0], rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="pooling"):
        enc.encode(texts, pooling="max")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(texts, batch_size=0)
    enc.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        enc.encode(texts)


def test_heads_logits_losses_and_gradients(ckpts) -> None:
    enc = load_model(ckpts["qwen3-gqa"]).train()
    ids, mask, flat, cu = batch()
    clf = SequenceClassifier(enc, num_labels=3, pooling="last")
    labels = torch.tensor([0, 2, 1, -100])
    out = clf(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 3)
    expected = torch.nn.functional.cross_entropy(out.logits, labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    packed = clf(flat, cu_seqlens=cu)
    torch.testing.assert_close(packed.logits, out.logits, rtol=0, atol=1e-5)
    assert packed.loss is None
    out.loss.backward()
    assert clf.score.weight.grad is not None and enc.layers[0].attn.wq.weight.grad is not None
    reg = SequenceClassifier(enc, num_labels=1)
    targets = torch.tensor([0.5, -1.0, 2.0, 0.0])
    r = reg(flat, cu_seqlens=cu, labels=targets)
    torch.testing.assert_close(r.loss, torch.nn.functional.mse_loss(r.logits[:, 0], targets))

    ner = TokenClassifier(enc, num_labels=5)
    tags = torch.randint(0, 5, ids.shape)
    out = ner(ids, attention_mask=mask, labels=tags)
    assert out.logits.shape == (4, 13, 5)
    real = mask.bool()
    expected = torch.nn.functional.cross_entropy(out.logits[real], tags[real])
    torch.testing.assert_close(out.loss, expected)  # padding positions are ignored
    packed = ner(flat, cu_seqlens=cu, labels=tags[real])
    torch.testing.assert_close(packed.loss, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="num_labels"):
        TokenClassifier(enc, num_labels=0)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(enc, num_labels=2, pooling="cls")
    with pytest.raises(ValueError, match="labels"):
        clf(ids, attention_mask=mask, labels=labels[:2])


def test_gradient_checkpointing_gives_the_same_gradients(ckpts) -> None:
    _, _, flat, cu = batch()
    grads = []
    for flag in (False, True):
        enc = load_model(ckpts["qwen3-mqa"]).train()
        enc.gradient_checkpointing = flag
        enc(flat, cu_seqlens=cu).square().mean().backward()
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_close_to_float32(ckpts) -> None:
    ref = load_model(ckpts["gemma3"])
    enc = load_model(ckpts["gemma3"], dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.lm_head_weight.dtype == torch.bfloat16
    _, _, flat, cu = batch()
    with torch.no_grad():
        out, expected = enc(flat, cu_seqlens=cu), ref(flat, cu_seqlens=cu)
    assert out.dtype == torch.bfloat16
    err = (out.float() - expected).abs().max() / expected.abs().max()
    assert err < 0.05, err
    converted = ref.to(torch.bfloat16)  # .to(dtype) keeps the RoPE frequencies in float32
    assert converted.inv_freq_full_attention.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(converted(flat, cu_seqlens=cu), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend",
    [
        # dynamo without code generation: checks that the whole forward traces as one graph
        # (custom attention op included); aot_eager/inductor cost minutes on a 2-core CPU
        "eager",
        # inductor's C++/Triton code generation takes minutes on a 2-core CPU: GPU only
        pytest.param("inductor", marks=pytest.mark.gpu),
    ],
)
def test_torch_compile_fullgraph(ckpts, backend: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = load_model(ckpts["qwen3-mqa"], device=device).train()
    _, _, flat, cu = batch(lengths=(6, 3))
    flat, cu = flat.to(device), cu.to(device)
    compiled = torch.compile(enc, fullgraph=True, dynamic=False, backend=backend)
    out = compiled(flat, cu_seqlens=cu, max_seqlen=6)
    torch.testing.assert_close(out, enc(flat, cu_seqlens=cu), rtol=0, atol=ATOL)
    out.square().mean().backward()
    assert enc.layers[0].attn.wq.weight.grad is not None


def test_encoder_constructed_directly_runs_and_saves(tmp_path: Path) -> None:
    from bidirlm.runtime.models.qwen3 import parse_config

    config = parse_config(CONFIGS["qwen3-gqa"])
    enc = Encoder(config)
    assert enc.lm_head_weight.shape == (500, 64) and enc.tokenizer is None
    ids = torch.randint(0, 500, (2, 5))
    with torch.no_grad():
        out = enc(ids)
    assert out.shape == (2, 5, 64)
    enc.save_pretrained(tmp_path)  # a full config.json even without a source dict
    raw = json.loads((tmp_path / "config.json").read_text())
    assert (
        raw["hidden_size"] == 64 and raw["num_key_value_heads"] == 2 and raw["is_causal"] is False
    )
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), out)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        parse_config({**CONFIGS["qwen3-gqa"], "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        parse_config({**CONFIGS["qwen3-gqa"], "rope_parameters": {"rope_type": "dynamic"}})
