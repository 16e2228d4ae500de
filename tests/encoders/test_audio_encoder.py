"""AudioEncoder: token count from the convolution arithmetic, padding masked out of the attention (changing
audio beyond a clip's real part, outside its tokens' receptive field, changes none of its tokens), rates."""

import pytest
import torch

from moezoo.encoders.audio import CLIP_SAMPLES, HOP_LENGTH, N_FFT, SAMPLE_RATE, AudioEncoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return AudioEncoder(dim=32, depth=2, num_heads=4).eval()


def clip(samples, seed):
    return torch.randn(samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_tokens_are_half_the_mel_frames(encoder):
    tokens, mask = encoder(clip(CLIP_SAMPLES, 0))
    frames = 1 + CLIP_SAMPLES // HOP_LENGTH  # 65 centred STFT frames
    assert tokens.shape == (1, (frames + 1) // 2, 32) and mask.all()


def test_padding_is_masked_out_of_the_attention(encoder):
    real = 6000
    tokens_real = encoder.num_tokens(1 + real // HOP_LENGTH)
    # token t reads frames 2t-2 .. 2t+2 (two convolutions); frame f reads samples f*HOP +- N_FFT/2
    last_sample_read = (2 * (tokens_real - 1) + 2) * HOP_LENGTH + N_FFT // 2
    audio = clip(CLIP_SAMPLES, 1)
    changed = audio.clone()
    changed[last_sample_read + 1:] = clip(CLIP_SAMPLES - last_sample_read - 1, 2) * 5
    with torch.no_grad():
        a, mask = encoder(torch.stack([audio, audio]), lengths=[real, CLIP_SAMPLES])
        b, _ = encoder(torch.stack([changed, changed]), lengths=[real, CLIP_SAMPLES])
    assert mask[0].sum() == tokens_real and mask[1].all()
    torch.testing.assert_close(a[0, :tokens_real], b[0, :tokens_real])  # masked: unchanged
    assert not torch.allclose(a[1, :tokens_real], b[1, :tokens_real])  # unmasked: the attention saw the change


def test_lengths_at_another_rate_count_in_resampled_samples(encoder):
    audio = clip(8192, 3)  # 1.024 s at 8 kHz -> 16384 samples at 16 kHz
    _, mask = encoder(audio[None], sample_rate=8000, lengths=[4000])
    assert mask.sum() == encoder.num_tokens(1 + (4000 * SAMPLE_RATE // 8000) // HOP_LENGTH)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[100, 200]), "one positive sample count per clip"),
    (dict(lengths=[0]), "one positive sample count per clip"),
])
def test_bad_lengths_are_refused(encoder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        encoder(clip(4000, 4)[None], **kwargs)


def test_too_long_audio_is_refused():
    with pytest.raises(ValueError, match="longer than this encoder"):
        AudioEncoder(dim=8, depth=1, num_heads=2, max_tokens=10)(clip(CLIP_SAMPLES, 5))
