"""UniMoE-Audio (zoo/models/unimoe_audio.py): the delay pattern, prompts, the loss against a hand-written
per-position cross-entropy, cached generation against decoding with full forwards, guidance, routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import randomise
from moezoo.zoo import create_model
from moezoo.zoo.models.unimoe_audio import delay_codes, delay_mask, undelay_codes
from tolerance import fp_tolerance

# whole tiny networks (D=32, 2 blocks), longest reduction the 64-wide dense FFN
TOL = fp_tolerance(torch.float32, 64, layers=6)


def tiny(ffn="dcmoe", seed=0, **overrides):
    return randomise(create_model("test_unimoe_audio", ffn=ffn, **overrides), seed=seed).eval()


def random_codes(batch=2, frames=5, seed=1, model=None):
    K = model.config.codebook_size if model is not None else 16
    Q = model.config.num_codebooks if model is not None else 3
    return torch.randint(0, K, (batch, Q, frames), generator=torch.Generator().manual_seed(seed))


def test_delay_pattern_by_hand():
    codes = torch.arange(1, 7).reshape(1, 2, 3)  # codebook 0: 1 2 3, codebook 1: 4 5 6
    delayed = delay_codes(codes, pad=0)
    assert delayed.tolist() == [[[1, 2, 3, 0], [0, 4, 5, 6]]]
    assert torch.equal(undelay_codes(delayed), codes)
    assert delay_mask(2, 3).tolist() == [[True, True, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="no whole frame"):
        undelay_codes(torch.zeros(1, 4, 2, dtype=torch.long))


def test_prompts_become_word_ids_padded_with_the_null_prompt():
    model = tiny()
    ids = model.tokenize(["The word", "a NOTE x"])
    vocab, null, unk = model.config.vocabulary, model.null_text_id, len(model.config.vocabulary)
    assert ids.tolist() == [[vocab.index("the"), vocab.index("word"), null, null],
                            [vocab.index("a"), vocab.index("note"), unk, null]]
    assert model.unknown_words("a note x") == ["x"]
    with pytest.raises(ValueError, match="at most 4"):
        model.tokenize("a a a a a")
    with pytest.raises(ValueError, match="non-empty string"):
        model.tokenize([""])


@pytest.mark.parametrize("ffn", ["dense", "dcmoe"])
def test_training_loss_is_the_per_codebook_cross_entropy_of_placed_codes(ffn):
    model = tiny(ffn, text_dropout_prob=0.0)
    cfg = model.config
    text, codes = model.tokenize(["the word", "a note"]), random_codes(model=model)
    loss, aux = model.training_loss(text, codes)
    # by hand: build the delayed input sequence position by position and sum the CE of real codes
    B, Q, T = codes.shape
    steps = T + Q - 1
    target = torch.full((B, Q, steps), cfg.pad_code)
    for q in range(Q):
        for t in range(T):
            target[:, q, t + q] = codes[:, q, t]
    inputs = torch.cat([torch.full((B, Q, 1), cfg.bos_code), target[:, :, :-1]], dim=2)
    logits = model(text, inputs)
    expected = 0.0
    for q in range(Q):
        rows = [(b, s) for b in range(B) for s in range(steps) if target[b, q, s] != cfg.pad_code]
        picked = torch.stack([logits[b, q, s] for b, s in rows])
        expected = expected + F.cross_entropy(picked, torch.stack([target[b, q, s] for b, s in rows]))
    torch.testing.assert_close(loss, expected, **TOL)
    if ffn == "dcmoe":
        assert aux.requires_grad and float(aux.detach()) > 0
    else:
        assert float(aux) == 0.0


def test_text_dropout_uses_the_null_prompt():
    model = tiny("dense", text_dropout_prob=1.0)
    text, codes = model.tokenize(["the word", "a note"]), random_codes(model=model)
    dropped, _ = model.training_loss(text, codes)
    null = torch.full_like(text, model.null_text_id)
    torch.testing.assert_close(dropped, model.training_loss(null, codes, text_dropout_prob=0.0)[0], **TOL)
    assert model.config.text_dropout_prob == 1.0  # the override does not touch the config


def _greedy_by_full_forwards(model, text, num_frames):
    """Decode without a cache: rerun the whole sequence for every step (what the KV cache must reproduce)."""
    cfg, B = model.config, text.shape[0]
    seq = torch.full((B, cfg.num_codebooks, 1), cfg.bos_code)
    placed = delay_mask(cfg.num_codebooks, num_frames)
    for s in range(num_frames + cfg.num_codebooks - 1):
        codes = model(text, seq)[:, :, -1].argmax(-1)
        codes = torch.where(placed[:, s], codes, torch.full_like(codes, cfg.pad_code))
        seq = torch.cat([seq, codes[:, :, None]], dim=2)
    return undelay_codes(seq[:, :, 1:])


@pytest.mark.parametrize("ffn", ["dense", "dcmoe"])
def test_cached_generation_equals_decoding_with_full_forwards(ffn):
    model = tiny(ffn)
    text = model.tokenize(["the word", "a note"])
    with torch.no_grad():
        expected = _greedy_by_full_forwards(model, text, 6)
    assert torch.equal(model.generate(text, 6, temperature=0), expected)


def test_guidance_mixes_conditional_and_null_prompt_logits():
    model = tiny("dense")
    text = model.tokenize(["the word"])
    null = torch.full_like(text, model.null_text_id)
    bos = torch.full((1, model.config.num_codebooks, 1), model.config.bos_code)
    with torch.no_grad():
        cond, uncond = model(text, bos)[:, :, -1], model(null, bos)[:, :, -1]
    first = (uncond + 3.0 * (cond - uncond)).argmax(-1)[0, 0]
    codes = model.generate(text, 4, guidance_scale=3.0, temperature=0)
    assert codes[0, 0, 0] == first


def test_a_prompts_sample_depends_only_on_its_own_generator():
    model = tiny()
    text = model.tokenize(["the word", "a note"])
    both = model.generate(text, 5, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    alone = model.generate(text[1:], 5, generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(both[1:], alone)


def test_generation_reports_experts_per_step_for_every_routed_layer():
    model = tiny()
    codes, used = model.generate(model.tokenize(["the word", "a note"]), 5, return_routing=True)
    Q = model.config.num_codebooks
    assert codes.shape == (2, Q, 5) and len(used) == model.config.depth
    most = model.config.num_experts + model.config.num_null_experts
    for layer in used:
        assert layer.shape == (2, 5 + Q - 1) and int(layer.min()) >= 1 and int(layer.max()) <= most


def test_bad_arguments_are_refused():
    model = tiny()
    text = model.tokenize(["the word"])
    with pytest.raises(ValueError, match=r"num_frames must be in \[1, 12\]"):
        model.generate(text, 13)
    with pytest.raises(ValueError, match="codes must be"):
        model.training_loss(text, torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="top_p"):
        create_model("test_unimoe_audio", top_p=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        create_model("test_unimoe_audio", vocabulary=("A", "a"))
    with pytest.raises(ValueError, match="UniMoEAudioConfig.dim must be int"):
        create_model("test_unimoe_audio", dim=32.0)


def test_active_parameters_count_the_experts_a_token_uses():
    model = create_model("test_unimoe_audio")
    cfg = model.config
    total = model.num_parameters()
    per_expert = 3 * cfg.dim * cfg.expert_hidden
    assert model.num_parameters(active=True, experts_per_token=1) == total - cfg.depth * (cfg.num_experts - 1) * per_expert


def test_stage_two_assembles_a_dcmoe_model_from_dense_protos():
    """Outside the FFNs: the protos' average; each block's experts: the protos' FFNs in slices whose sum is
    each proto's FFN (checked by evaluating the experts by hand)."""
    from moezoo.zoo.models.unimoe_audio import UniMoEAudio

    protos = [tiny("dense", seed=s) for s in (3, 4)]
    merged = UniMoEAudio.from_dense_protos(protos, num_null_experts=1).eval()
    assert merged.config.ffn == "dcmoe" and merged.config.expert_hidden == 64 // 2
    torch.testing.assert_close(merged.blocks[1].attn.qkv.weight,
                               (protos[0].blocks[1].attn.qkv.weight + protos[1].blocks[1].attn.qkv.weight) / 2)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    moe = merged.blocks[0].moe
    for p, experts in ((protos[0], range(0, 2)), (protos[1], range(2, 4))):
        by_slices = sum(moe.w_out[e] @ (F.silu(moe.w_in[e, :32] @ x.T) * (moe.w_in[e, 32:] @ x.T)) for e in experts)
        torch.testing.assert_close(by_slices.T, p.blocks[0].mlp(x), **TOL)
    with pytest.raises(ValueError, match="dense UniMoEAudio"):
        UniMoEAudio.from_dense_protos([tiny("dcmoe")])
    with pytest.raises(ValueError, match="equal slices"):
        UniMoEAudio.from_dense_protos(protos, num_experts=6)
