"""The multimodal LM (zoo/models/moe_vlm.py): the sequence layout and modality ids, the loss against a hand-written
cross-entropy, cached generation against decoding with full forwards, upcycling equal at step 0, the patch
merge, errors, and the export round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import randomise
from moezoo.zoo import create_model, save_pretrained
from moezoo.zoo.layers.routed import RoutedBlock
from moezoo.zoo.models.moe_vlm import AUDIO, IMAGE, TEXT, MoEVLM, _merge_patches, config_dict
from tolerance import fp_tolerance

# whole tiny networks (D=32, 2 blocks + encoders); the longest reduction is the 128-wide merged patch features
TOL = fp_tolerance(torch.float32, 128, layers=8)
PROMPTS = ["what shape is the red object?", "how many circles are there?"]
ANSWERS = ["circle", "two"]


def tiny(ffn="dense", seed=0, **overrides) -> MoEVLM:
    return randomise(create_model("test_moe_vlm", ffn=ffn, **overrides), seed=seed).eval()


def images(batch=2, seed=1):
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sounds(batch=2, seed=2, samples=16_000):
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def full_logits(model: MoEVLM, images_, audio, word_ids):
    x, modality, _, positions = model.sequence(images_, audio, word_ids)
    return model.head(model.run_blocks(x, modality, position_ids_3BS=positions)), modality


def test_sequence_layout_and_modality_ids():
    model = tiny()
    words = [model.encode_prompt(p) for p in PROMPTS]
    _, modality, lengths, positions = model.sequence(images(), sounds(), words)
    n_img, n_aud = model.num_image_tokens, model.num_audio_tokens
    assert n_img == 16  # 64 patches of the 64 px ViT merged 2 x 2
    expected = [TEXT] + [IMAGE] * n_img + [AUDIO] * n_aud
    assert modality[0, : len(expected)].tolist() == expected
    assert (modality[:, len(expected):] == TEXT).all()
    assert lengths.tolist() == [1 + n_img + n_aud + len(w) for w in words]
    # Qwen2-VL's ids, written out: <bos> 0; the 4 x 4 image at 1 (rows and columns 1..4); audio and words
    # one id each from 1 + 4 (the image's side) on
    image_ids = [(1, 1 + r, 1 + c) for r in range(4) for c in range(4)]
    rest = range(5, 5 + modality.shape[1] - 1 - n_img)
    expected_ids = [(0, 0, 0)] + image_ids + [(i, i, i) for i in rest]
    assert [tuple(column) for column in positions[:, 0].T.tolist()] == expected_ids


def test_merge_patches_by_hand():
    tokens = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, value = row * 4 + column
    merged = _merge_patches(tokens, 2)
    assert merged.shape == (1, 4, 4)
    assert merged[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_loss_is_the_answer_cross_entropy():
    model = tiny()
    loss, _ = model.training_loss(images(), None, PROMPTS, ANSWERS)
    sep, eos = model.special_id("<sep>"), model.special_id("<eos>")
    terms = []
    for b, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):  # one row at a time, no padding
        target = model.vocab.encode(answer) + [eos]
        ids = model.vocab.encode(prompt) + [sep] + target
        logits, _ = full_logits(model, images()[b: b + 1], None, [ids])
        first = logits.shape[1] - len(target)
        terms += [F.cross_entropy(logits[0, first - 1 + i], torch.tensor(t)) for i, t in enumerate(target)]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), **TOL)


@pytest.mark.parametrize("positions", ["learned", "mrope"])
@pytest.mark.parametrize("ffn", ["dense", "moiie", "moma", "mot", "moe_llava"])
def test_cached_generation_matches_full_forwards(ffn, positions):
    overrides = {"eval_capacity_factor": 100.0} if ffn == "moe_llava" else {}
    model = tiny(ffn, positions=positions, **overrides)
    out = model.generate(images(1), None, PROMPTS[:1], max_new_tokens=4)
    ids = model.encode_prompt(PROMPTS[0]) + [model.special_id("<sep>")]
    expected = []
    for _ in range(4):  # greedy decoding by re-running the whole sequence each step
        logits, _ = full_logits(model, images(1), None, [ids])
        last = logits[0, -1].clone()
        last[[model.special_id(s) for s in ("<pad>", "<bos>", "<sep>")]] = float("-inf")
        token = int(last.argmax())
        if token == model.special_id("<eos>"):
            break
        expected.append(token)
        ids.append(token)
    assert out.token_ids[0] == expected


def test_rows_of_other_prompt_lengths_answer_as_alone():
    model = tiny()
    together = model.generate(images(2), None, PROMPTS, max_new_tokens=3)
    alone = [model.generate(images(2)[b: b + 1], None, [p], max_new_tokens=3).token_ids[0] for b, p in enumerate(PROMPTS)]
    assert together.token_ids == alone


@pytest.mark.parametrize("ffn,overrides", [("dense", {"ffn_hidden": 64}), ("moiie", {}), ("mot", {"ffn_hidden": 64}),
                                           ("moe_llava", {"eval_capacity_factor": 100.0})])
@pytest.mark.parametrize("qk_norm,positions", [(False, "learned"), (True, "mrope")])
def test_upcycled_model_starts_as_the_dense_one(ffn, overrides, qk_norm, positions):
    dense = tiny("dense", qk_norm=qk_norm, positions=positions)
    up = MoEVLM.upcycle(dense, ffn, **overrides).eval()
    words = [dense.encode_prompt(p) for p in PROMPTS]
    expected, _ = full_logits(dense, images(), sounds(), words)
    got, _ = full_logits(up, images(), sounds(), words)
    torch.testing.assert_close(got, expected, **TOL)
    if ffn != "dense":
        assert any(isinstance(m, RoutedBlock) for m in up.modules()) or ffn == "mot"


def test_upcycled_moe_llava_starts_as_copies():
    up = MoEVLM.upcycle(tiny("dense"), "moe_llava", moe_layers="every_other")
    routed = [i for i, b in enumerate(up.blocks) if isinstance(b.ffn, RoutedBlock)]
    assert routed == [1]
    experts = up.blocks[1].ffn
    for e in range(1, experts.num_experts):
        assert torch.equal(experts.w_in[e], experts.w_in[0]) and torch.equal(experts.w_out[e], experts.w_out[0])


def test_routing_is_returned_per_token():
    model = tiny("moiie")
    out = model.generate(images(2), None, PROMPTS, max_new_tokens=2, return_routing=True)
    for b in range(2):
        modality = out.modality[b]
        experts = out.routing[0][b]
        assert experts.shape[0] == modality.shape[0]
        image_rows = modality == IMAGE
        allowed = set(model.blocks[0].ffn.experts_of(IMAGE))
        assert set(experts[image_rows].flatten().tolist()) <= allowed


def test_mot_routing_is_the_modality():
    model = tiny("mot")
    out = model.generate(None, sounds(1), ["which word is this?"], max_new_tokens=1, return_routing=True)
    assert torch.equal(out.routing[0][0][:, 0], out.modality[0])


def test_bad_inputs_say_what_is_accepted():
    model = tiny()
    with pytest.raises(ValueError, match="no words"):
        model.generate(images(1), None, ["?!"])
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 64, 64\]"):
        model.generate(torch.zeros(1, 3, 32, 32), None, PROMPTS[:1])
    with pytest.raises(ValueError, match="longer than"):
        model.generate(None, sounds(1, samples=40_000), PROMPTS[:1])
    with pytest.raises(ValueError, match="at most"):
        model.generate(images(1), None, ["what " * 40])
    with pytest.raises(ValueError, match="one of each per prompt"):
        model.generate(images(2), None, PROMPTS[:1] * 3)
    with pytest.raises(ValueError, match="upcycle starts from a dense model"):
        MoEVLM.upcycle(tiny("moiie"), "moma")
    with pytest.raises(ValueError, match="unknown ffn"):
        create_model("test_moe_vlm", ffn="sparse")


def test_export_round_trip(tmp_path):
    model = tiny("moma")
    save_pretrained(model, tmp_path, "test_moe_vlm", config_dict(model.config))
    again = create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert again.config == model.config
    words = [model.encode_prompt(p) for p in PROMPTS]
    torch.testing.assert_close(full_logits(again, images(), None, words)[0], full_logits(model, images(), None, words)[0],
                               rtol=0, atol=0)
