"""The synthetic Gemma 4 target + MTP assistant GGUF pair: determinism and loader-facing layout.

Most tests copy the tokenizer from a small fake vocabulary so that gguf.GGUFReader (slow on a
262144-token vocabulary) reads the written files in milliseconds; the real Gemma 3 tokenizer is
exercised for determinism, verbatim copying and file size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from gemma4_fleet import synthetic
from gemma4_fleet.synthetic import SyntheticPair, shape_spec, write_pair

pytestmark = pytest.mark.unit

FAKE_VOCAB = 1024
AGREE_ID, DISAGREE_ID = 300, 301


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tensor-less GGUF holding only a small SentencePiece-style vocabulary."""
    path = tmp_path_factory.mktemp("tok") / "fake-tokenizer.gguf"
    tokens = [f"tok{i}" for i in range(FAKE_VOCAB)]
    tokens[AGREE_ID], tokens[DISAGREE_ID] = "\u2581fleet", "\u2581drift"
    writer = GGUFWriter(path, "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(FAKE_VOCAB)])
    writer.add_token_types([1] * FAKE_VOCAB)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def pair(fake_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> SyntheticPair:
    return write_pair(tmp_path_factory.mktemp("pair"), tokenizer_from=fake_tokenizer)


def kv(reader: GGUFReader, key: str) -> Any:
    field = reader.fields[key]
    value = field.contents()
    if field.types[0] == GGUFValueType.ARRAY:
        return list(value)
    return value


def tensors(reader: GGUFReader) -> dict[str, list[int]]:
    """Tensor name -> ggml shape (ne0 first, the order llama.cpp's create_tensor checks)."""
    return {t.name: [int(x) for x in t.shape] for t in reader.tensors}


def dequantized(reader: GGUFReader, name: str) -> np.ndarray:
    """A quantized tensor as a float32 ``[rows, cols]`` array."""
    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(dequantize(np.asarray(t.data), GGMLQuantizationType(t.tensor_type)))


def test_file_names_and_defaults(pair: SyntheticPair) -> None:
    assert pair.target.name == "gemma4-synthetic-tiny-target.gguf"
    assert pair.drafter.name == "gemma4-synthetic-tiny-assistant.gguf"
    assert pair.target.parent == pair.drafter.parent


def test_same_arguments_give_identical_bytes(fake_tokenizer: Path, tmp_path: Path) -> None:
    a = write_pair(tmp_path / "a", tokenizer_from=fake_tokenizer, seed=7)
    b = write_pair(tmp_path / "b", tokenizer_from=fake_tokenizer, seed=7)
    assert sha256(a.target) == sha256(b.target)
    assert sha256(a.drafter) == sha256(b.drafter)
    c = write_pair(tmp_path / "c", tokenizer_from=fake_tokenizer, seed=8)
    assert sha256(c.target) != sha256(a.target)
    assert sha256(c.drafter) != sha256(a.drafter)
    assert c.target.stat().st_size == a.target.stat().st_size  # only weights differ


def test_target_keys_satisfy_the_gemma4_loader(pair: SyntheticPair, fake_tokenizer: Path) -> None:
    r = GGUFReader(pair.target)
    assert kv(r, "general.architecture") == "gemma4"
    n_layer = kv(r, "gemma4.block_count")
    pattern = kv(r, "gemma4.attention.sliding_window_pattern")
    shared = kv(r, "gemma4.attention.shared_kv_layers")
    assert len(pattern) == n_layer
    assert all(isinstance(x, bool) for x in pattern)
    assert True in pattern and False in pattern  # SWA and full layers mixed
    assert shared > 0  # shared-KV layers present
    n_kv = n_layer - shared
    # llama-kv-cache.cpp: shared layers reuse the last KV-owning SWA / full layers ...
    assert pattern[n_kv - 2] is True and pattern[n_kv - 1] is False
    # ... and the assistant reuses the target's layers n_layer-2 (SWA) and n_layer-1 (full).
    assert pattern[-2] is True and pattern[-1] is False
    assert kv(r, "gemma4.embedding_length_per_layer_input") == 0
    hd_full = kv(r, "gemma4.attention.key_length")
    hd_swa = kv(r, "gemma4.attention.key_length_swa")
    assert hd_full != hd_swa
    assert kv(r, "gemma4.attention.value_length") == hd_full
    assert kv(r, "gemma4.attention.value_length_swa") == hd_swa
    assert kv(r, "gemma4.rope.dimension_count") == hd_full
    assert kv(r, "gemma4.rope.dimension_count_swa") == hd_swa
    assert kv(r, "gemma4.attention.sliding_window") > 0
    n_head = kv(r, "gemma4.attention.head_count")
    head_kv = kv(r, "gemma4.attention.head_count_kv")
    assert len(head_kv) == n_layer and all(n_head % h == 0 for h in head_kv)
    assert kv(r, "tokenizer.ggml.tokens") == kv(GGUFReader(fake_tokenizer), "tokenizer.ggml.tokens")


def test_target_tensors_have_the_shapes_gemma4_cpp_creates(pair: SyntheticPair) -> None:
    r = GGUFReader(pair.target)
    t = tensors(r)
    n_embd = kv(r, "gemma4.embedding_length")
    n_ff = kv(r, "gemma4.feed_forward_length")
    n_head = kv(r, "gemma4.attention.head_count")
    head_kv = kv(r, "gemma4.attention.head_count_kv")
    pattern = kv(r, "gemma4.attention.sliding_window_pattern")
    n_kv = len(pattern) - kv(r, "gemma4.attention.shared_kv_layers")
    hd_full = kv(r, "gemma4.attention.key_length")
    hd_swa = kv(r, "gemma4.attention.key_length_swa")

    expected: dict[str, list[int]] = {
        "token_embd.weight": [n_embd, FAKE_VOCAB],
        "output_norm.weight": [n_embd],
        "rope_freqs.weight": [hd_full // 2],  # one global copy, first full layer
    }
    for il, swa in enumerate(pattern):
        hd = hd_swa if swa else hd_full
        p = f"blk.{il}."
        expected |= {
            p + "attn_norm.weight": [n_embd],
            p + "attn_q.weight": [n_embd, n_head * hd],
            p + "attn_output.weight": [n_head * hd, n_embd],
            p + "attn_q_norm.weight": [hd],
            p + "post_attention_norm.weight": [n_embd],
            p + "layer_output_scale.weight": [1],
            p + "ffn_norm.weight": [n_embd],
            p + "ffn_gate.weight": [n_embd, n_ff],
            p + "ffn_up.weight": [n_embd, n_ff],
            p + "ffn_down.weight": [n_ff, n_embd],
            p + "post_ffw_norm.weight": [n_embd],
        }
        if il < n_kv:
            expected |= {
                p + "attn_k.weight": [n_embd, head_kv[il] * hd],
                p + "attn_v.weight": [n_embd, head_kv[il] * hd],
                p + "attn_k_norm.weight": [hd],
            }
    assert t == expected
    # shared-KV layers really lack K/V
    assert f"blk.{len(pattern) - 1}.attn_k.weight" not in t
    freqs = next(x for x in r.tensors if x.name == "rope_freqs.weight").data
    assert set(np.unique(freqs).tolist()) == {1.0, np.float32(1e30)}


def test_assistant_matches_target(pair: SyntheticPair) -> None:
    tr, ar = GGUFReader(pair.target), GGUFReader(pair.drafter)
    a = "gemma4-assistant"
    assert kv(ar, "general.architecture") == a
    n_target = kv(tr, "gemma4.embedding_length")
    n_embd = kv(ar, f"{a}.embedding_length")
    assert kv(ar, f"{a}.embedding_length_out") == n_target
    assert n_embd != n_target  # gemma4-assistant.cpp throws when they are equal
    n_layer = kv(ar, f"{a}.block_count")
    assert kv(ar, f"{a}.nextn_predict_layers") == n_layer
    for key in ("key_length", "key_length_swa", "value_length", "value_length_swa"):
        assert kv(ar, f"{a}.attention.{key}") == kv(tr, f"gemma4.attention.{key}")
    pattern = kv(ar, f"{a}.attention.sliding_window_pattern")
    assert len(pattern) == n_layer and True in pattern and False in pattern
    # KV heads per layer type as in the target layers whose cache it reads
    t_pattern = kv(tr, "gemma4.attention.sliding_window_pattern")
    t_head_kv = dict(zip(t_pattern, kv(tr, "gemma4.attention.head_count_kv"), strict=True))
    assert kv(ar, f"{a}.attention.head_count_kv") == [t_head_kv[s] for s in pattern]
    assert kv(ar, f"{a}.attention.sliding_window") == kv(tr, "gemma4.attention.sliding_window")

    t = tensors(ar)
    assert t["token_embd.weight"] == [n_embd, FAKE_VOCAB]
    assert t["nextn.pre_projection.weight"] == [2 * n_target, n_embd]
    assert t["nextn.post_projection.weight"] == [n_embd, n_target]
    assert t["rope_freqs.weight"] == tensors(tr)["rope_freqs.weight"]
    assert not [name for name in t if ".attn_k" in name or ".attn_v" in name]
    for il in range(n_layer):
        assert t[f"blk.{il}.layer_output_scale.weight"] == [1]
        assert f"blk.{il}.attn_q.weight" in t and f"blk.{il}.post_ffw_norm.weight" in t
    assert f"blk.{n_layer}.attn_norm.weight" not in t


def test_target_and_drafter_favour_the_same_token(
    pair: SyntheticPair, fake_tokenizer: Path, tmp_path: Path
) -> None:
    target = dequantized(GGUFReader(pair.target), "token_embd.weight")
    drafter = dequantized(GGUFReader(pair.drafter), "token_embd.weight")
    for table in (target, drafter):
        # dimension 0 dominates every row (what makes the final hidden state ~ e0) ...
        assert np.all(np.abs(table[:, 0]) > 3 * np.linalg.norm(table[:, 1:], axis=1))
        # ... and is largest for exactly one token
        assert np.count_nonzero(table[:, 0] == table[:, 0].max()) == 1
    assert int(target[:, 0].argmax()) == int(drafter[:, 0].argmax()) == AGREE_ID

    other = write_pair(tmp_path, tokenizer_from=fake_tokenizer, drafter_agrees=False)
    assert other.drafter.name == "gemma4-synthetic-tiny-assistant-disagreeing.gguf"
    assert sha256(other.target) == sha256(pair.target)
    disagreeing = dequantized(GGUFReader(other.drafter), "token_embd.weight")
    assert int(disagreeing[:, 0].argmax()) == DISAGREE_ID


def test_mismatched_drafter_declares_a_wrong_target_width(
    pair: SyntheticPair, fake_tokenizer: Path, tmp_path: Path
) -> None:
    bad = write_pair(tmp_path, tokenizer_from=fake_tokenizer, mismatched_drafter=True)
    assert bad.drafter.name == "gemma4-synthetic-tiny-assistant-mismatched.gguf"
    assert sha256(bad.target) == sha256(pair.target)
    assert sha256(bad.drafter) != sha256(pair.drafter)
    n_target = kv(GGUFReader(bad.target), "gemma4.embedding_length")
    ar = GGUFReader(bad.drafter)
    n_out = kv(ar, "gemma4-assistant.embedding_length_out")
    assert n_out != n_target
    # self-consistent with its own (wrong) width: only the pairing is wrong
    t = tensors(ar)
    assert t["nextn.pre_projection.weight"][0] == 2 * n_out
    assert t["nextn.post_projection.weight"][1] == n_out


def test_real_gemma3_tokenizer_is_copied_verbatim(gemma3_270m: Path, tmp_path: Path) -> None:
    a = write_pair(tmp_path / "a", tokenizer_from=gemma3_270m)
    b = write_pair(tmp_path / "b", tokenizer_from=gemma3_270m)
    assert sha256(a.target) == sha256(b.target) and sha256(a.drafter) == sha256(b.drafter)
    source_records, source_tokens = synthetic._tokenizer_records(gemma3_270m)
    assert len(source_tokens) == 262144
    for path in (a.target, a.drafter):
        assert synthetic._tokenizer_records(path) == (source_records, source_tokens)
    # CI cost: far below the ~150 MB / ~75 MB of an F16 pair at this vocabulary size
    assert a.target.stat().st_size < 20_000_000
    assert a.drafter.stat().st_size < 15_000_000


def test_12b_shape_is_a_loadable_12b_class_layout() -> None:
    s = shape_spec("12b")
    synthetic._check_shape(s)
    n_vocab = 262144
    params = sum(
        int(np.prod(t.shape)) for t in synthetic._target_tensors(0, s, n_vocab, favoured=1)
    )
    assert 11e9 < params < 13e9
    assert s.n_embd == 3840 and s.n_layer == 48
    with pytest.raises(ValueError, match="unknown shape"):
        shape_spec("7b")  # type: ignore[arg-type]


def test_cli_prints_paths_and_sha256(
    fake_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = synthetic.main([str(tmp_path), "--tokenizer-from", str(fake_tokenizer), "--seed", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, name in zip(
        lines,
        ["gemma4-synthetic-tiny-target.gguf", "gemma4-synthetic-tiny-assistant.gguf"],
        strict=True,
    ):
        path, digest = line.split("  sha256=")
        assert Path(path) == tmp_path / name
        assert digest == sha256(Path(path))


# --- cycle pairs (issue 14: a drafter with a chosen agreement) ---------------------------------
# The fake vocabulary has no "\u2581word" tokens, so the cycle is the 32 ids from its middle:
# 512..543, code i = id 512 + i (worked out from the rule in cycle_spec's docstring, not taken
# from the code under test).
CYCLE = list(range(FAKE_VOCAB // 2, FAKE_VOCAB // 2 + 32))


def rms_normed(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + 1e-6)


def greedy_of_weights(pair: SyntheticPair) -> tuple[dict[int, int], dict[int, int]]:
    """Token -> greedy next token of the target head and of the drafter, from the written weights:
    embedding * sqrt(n_embd) -> (pre-projection) -> RMS norm -> head, with the random blocks left
    out (their branches are scaled down to noise, see the module doc)."""
    tr, ar = GGUFReader(pair.target), GGUFReader(pair.drafter)
    embd = dequantized(tr, "token_embd.weight")
    head = dequantized(tr, "output.weight")
    pre = dequantized(ar, "nextn.pre_projection.weight")
    dhead = dequantized(ar, "token_embd.weight")
    n_embd = embd.shape[1]
    rng = np.random.default_rng(7)
    target, drafter = {}, {}
    for token in [*CYCLE, 3, 100, 777, 1023]:
        x = embd[token] * np.sqrt(n_embd)
        target[token] = int(np.argmax(head @ rms_normed(x)))
        hidden = rng.standard_normal(n_embd)  # the target's hidden state: must not matter
        drafter[token] = int(np.argmax(dhead @ rms_normed(pre @ np.concatenate([x, hidden]))))
    return target, drafter


@pytest.mark.parametrize("agreement", [0.3, 0.6, 0.9])
def test_cycle_pair_drafter_agrees_with_the_chosen_probability(
    fake_tokenizer: Path, tmp_path: Path, agreement: float
) -> None:
    pair = write_pair(tmp_path, tokenizer_from=fake_tokenizer, agreement=agreement)
    assert pair.target.name == "gemma4-synthetic-tiny-cycle-target.gguf"
    assert (
        pair.drafter.name
        == f"gemma4-synthetic-tiny-cycle-assistant-agree{agreement * 100:.0f}.gguf"
    )
    target, drafter = greedy_of_weights(pair)
    # The target walks the cycle: 512 -> 513 -> ... -> 543 -> 512, whatever the context.
    for i, token in enumerate(CYCLE):
        assert target[token] == CYCLE[(i + 1) % 32]
    # Other tokens enter the cycle at their id mod 32.
    assert target[100] == CYCLE[(100 % 32 + 1) % 32]
    # The drafter proposes the target's next token on round(p * 32) of the 32 cycle tokens ...
    right = [t for t in CYCLE if drafter[t] == target[t]]
    assert len(right) == round(agreement * 32)
    # ... and a wrong proposal is still a cycle token (one step too far).
    for i, token in enumerate(CYCLE):
        assert drafter[token] in (CYCLE[(i + 1) % 32], CYCLE[(i + 2) % 32])


def test_cycle_pairs_share_the_target_nest_their_agreement_and_are_deterministic(
    fake_tokenizer: Path, tmp_path: Path
) -> None:
    low = write_pair(tmp_path / "low", tokenizer_from=fake_tokenizer, agreement=0.3)
    high = write_pair(tmp_path / "high", tokenizer_from=fake_tokenizer, agreement=0.9)
    again = write_pair(tmp_path / "again", tokenizer_from=fake_tokenizer, agreement=0.9)
    assert sha256(low.target) == sha256(high.target) == sha256(again.target)
    assert sha256(high.drafter) == sha256(again.drafter) != sha256(low.drafter)
    target, low_drafter = greedy_of_weights(low)
    _, high_drafter = greedy_of_weights(high)
    low_right = {t for t in CYCLE if low_drafter[t] == target[t]}
    high_right = {t for t in CYCLE if high_drafter[t] == target[t]}
    assert low_right < high_right
    other_seed = write_pair(
        tmp_path / "seed1", tokenizer_from=fake_tokenizer, seed=1, agreement=0.9
    )
    assert sha256(other_seed.drafter) != sha256(high.drafter)


def test_cycle_pair_refuses_a_bad_agreement(fake_tokenizer: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"agreement must be within 0\.\.1"):
        write_pair(tmp_path, tokenizer_from=fake_tokenizer, agreement=1.5)
    with pytest.raises(ValueError, match="not both"):
        write_pair(tmp_path, tokenizer_from=fake_tokenizer, agreement=0.5, drafter_agrees=False)
