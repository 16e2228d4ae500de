"""moezoo.encoders.audio: the log-mel front end against a numpy computation from the formulas, the residual
quantiser against per-row loops, the vocoders' shapes, the MR-STFT loss by its formula, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moezoo.encoders.audio import (
    CLIP_FRAMES,
    CLIP_SAMPLES,
    F_MAX,
    HOP_LENGTH,
    LOG_MEL_FLOOR,
    LOG_MEL_MEAN,
    LOG_MEL_STD,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    AudioFrontEnd,
    GriffinLimVocoder,
    MelTokenizer,
    MelVocoder,
    ResidualVectorQuantizer,
    denormalize_log_mel,
    multi_resolution_stft_loss,
    nearest_codes,
    normalize_log_mel,
    num_frames,
    num_samples,
)
from tolerance import fp_tolerance


def sine(frequency: float, length: int = CLIP_SAMPLES, rate: int = SAMPLE_RATE, amplitude: float = 0.5):
    return amplitude * torch.sin(2 * math.pi * frequency * torch.arange(length, dtype=torch.float64) / rate).float()


# ----------------------------------------------------------------------------------------------------------
# An independent front end: Slaney's mel scale and filters written out, numpy's FFT
# ----------------------------------------------------------------------------------------------------------


def slaney_hz_to_mel(f):
    """Slaney's Auditory Toolbox: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per
    factor 6.4)."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))


def slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15, m * (200 / 3), 1000 * np.exp((m - 15) * (np.log(6.4) / 27)))


def slaney_filter_bank() -> tuple[np.ndarray, np.ndarray]:
    """(filters [N_MELS, N_FFT // 2 + 1], centre frequencies [N_MELS]): triangles between band edges evenly
    spaced in mel over 0..F_MAX, each scaled by 2 / (upper edge - lower edge) (equal area)."""
    edges = slaney_mel_to_hz(np.linspace(0, slaney_hz_to_mel(F_MAX), N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    filters = np.zeros((N_MELS, len(bins)))
    for m in range(N_MELS):
        low, centre, high = edges[m], edges[m + 1], edges[m + 2]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        filters[m] = np.maximum(0, np.minimum(rising, falling)) * 2 / (high - low)
    return filters, edges[1:-1]


def numpy_log_mel_frame(audio: np.ndarray, frame: int) -> np.ndarray:
    """Normalised log-mel of one centred frame that lies wholly inside the signal (no padding involved)."""
    start = frame * HOP_LENGTH - N_FFT // 2
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    magnitude = np.abs(np.fft.rfft(audio[start : start + N_FFT] * window))
    filters, _ = slaney_filter_bank()
    return (np.log(np.maximum(filters @ magnitude, LOG_MEL_FLOOR)) - LOG_MEL_MEAN) / LOG_MEL_STD


@pytest.mark.parametrize("frequency", [261.63, 1000.0, 3000.0])
def test_mel_of_a_sine_peaks_in_the_band_centred_nearest_its_frequency(frequency):
    mel = AudioFrontEnd()(sine(frequency))
    assert mel.shape == (1, N_MELS, CLIP_FRAMES)
    _, centres = slaney_filter_bank()
    middle = mel[0, :, CLIP_FRAMES // 2]
    assert int(middle.argmax()) == int(np.abs(centres - frequency).argmin())


def test_front_end_equals_the_numpy_computation_from_the_formulas():
    generator = torch.Generator().manual_seed(0)
    audio = 0.3 * torch.randn(CLIP_SAMPLES, generator=generator) + sine(440.0)
    mel = AudioFrontEnd()(audio)[0].double().numpy()
    for frame in (4, CLIP_FRAMES // 2, CLIP_FRAMES - 5):
        expected = numpy_log_mel_frame(audio.double().numpy(), frame)
        torch.testing.assert_close(torch.from_numpy(mel[:, frame]), torch.from_numpy(expected),
                                   **fp_tolerance(torch.float32, N_FFT, layers=2, scale=3.0))


def test_front_end_resamples_other_rates_and_checks_its_input():
    front_end = AudioFrontEnd()
    at_48k = front_end(sine(1000.0, 3 * CLIP_SAMPLES, 48_000), sample_rate=48_000)
    at_16k = front_end(sine(1000.0))
    assert at_48k.shape == at_16k.shape
    assert int(at_48k[0, :, 30].argmax()) == int(at_16k[0, :, 30].argmax())
    with pytest.raises(ValueError, match="too short"):
        front_end(torch.zeros(100))
    with pytest.raises(ValueError, match=r"\[N\] or \[B, N\]"):
        front_end(torch.zeros(1, 1, 4000))
    with pytest.raises(TypeError, match="floating-point"):
        front_end(torch.zeros(4000, dtype=torch.int16))
    with pytest.raises(ValueError, match="sample_rate"):
        front_end(torch.zeros(4000), sample_rate=0)


def test_normalisation_is_fixed_and_invertible_and_frames_match_samples():
    mel = torch.tensor([1e-7, 1e-5, 0.01, 1.0, 30.0])
    log_mel = normalize_log_mel(mel)
    torch.testing.assert_close(log_mel, (torch.log(mel.clamp_min(LOG_MEL_FLOOR)) - LOG_MEL_MEAN) / LOG_MEL_STD)
    torch.testing.assert_close(denormalize_log_mel(log_mel), mel.clamp_min(LOG_MEL_FLOOR))
    assert num_frames(CLIP_SAMPLES) == CLIP_FRAMES == 65 and num_samples(CLIP_FRAMES) == CLIP_SAMPLES


# ----------------------------------------------------------------------------------------------------------
# Residual vector quantisation
# ----------------------------------------------------------------------------------------------------------


def quantizer(num_codebooks=3, codebook_size=8, dim=4, seed=0, **kwargs) -> ResidualVectorQuantizer:
    torch.manual_seed(seed)
    rvq = ResidualVectorQuantizer(num_codebooks, codebook_size, dim, **kwargs)
    shrinking = 1 + torch.arange(num_codebooks)[:, None, None]  # later stages hold smaller residuals
    rvq.codebooks.copy_(torch.randn(num_codebooks, codebook_size, dim) / shrinking)
    rvq.initialized.fill_(True)
    return rvq


def nearest_by_loop(x_D: torch.Tensor, codebook_KD: torch.Tensor) -> int:
    distances = [float(((x_D.double() - c.double()) ** 2).sum()) for c in codebook_KD]
    return min(range(len(distances)), key=distances.__getitem__)


def test_codes_index_the_nearest_codeword_stage_by_stage_and_the_stages_add_up():
    rvq = quantizer().eval()
    x_ND = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    codes_NQ = rvq.quantize(x_ND)
    assert codes_NQ.shape == (40, 3) and codes_NQ.dtype == torch.int64
    for n in range(40):
        residual = x_ND[n].clone()
        for q in range(3):
            assert int(codes_NQ[n, q]) == nearest_by_loop(residual, rvq.codebooks[q])
            residual = residual - rvq.codebooks[q, codes_NQ[n, q]]
        total = sum(rvq.codebooks[q, codes_NQ[n, q]] for q in range(3))
        torch.testing.assert_close(rvq.lookup(codes_NQ[n : n + 1])[0], total)
        torch.testing.assert_close(rvq.lookup(codes_NQ[n : n + 1, :2])[0], total - rvq.codebooks[2, codes_NQ[n, 2]])
    assert torch.equal(rvq.quantize(x_ND, num_codebooks=2), codes_NQ[:, :2])
    assert torch.equal(nearest_codes(x_ND, rvq.codebooks[0]), codes_NQ[:, 0])


def test_later_stages_shrink_the_error_of_well_fitted_codebooks():
    rvq = quantizer(num_codebooks=3, codebook_size=16, dim=2).train()
    rvq.initialized.fill_(False)
    x_ND = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    rvq(x_ND)  # k-means init on this batch
    rvq.eval()
    errors = [float((rvq.lookup(rvq.quantize(x_ND, q)) - x_ND).square().mean()) for q in (1, 2, 3)]
    assert errors[0] < float(x_ND.square().mean()) and errors[1] < errors[0] and errors[2] < errors[1]


def test_training_forward_is_straight_through_with_a_commitment_loss():
    rvq = quantizer().eval()  # eval: no codebook update, so the expected values below stay fixed
    x_ND = torch.randn(10, 4, requires_grad=True)
    quantized_ND, codes_NQ, commitment = rvq(x_ND)
    expected = rvq.lookup(codes_NQ)
    torch.testing.assert_close(quantized_ND, expected)
    torch.testing.assert_close(commitment, ((x_ND - expected) ** 2).mean())
    quantized_ND.sum().backward()
    torch.testing.assert_close(x_ND.grad, torch.ones_like(x_ND))  # the straight-through gradient


def test_quantizer_dropout_applies_only_the_active_stages_of_each_row():
    rvq = quantizer().eval()
    x_ND = torch.randn(6, 4)
    active_N = torch.tensor([1, 2, 3, 1, 2, 3])
    quantized_ND, codes_NQ, _ = rvq(x_ND, active_N)
    for n in range(6):
        torch.testing.assert_close(quantized_ND[n], rvq.lookup(codes_NQ[n : n + 1, : int(active_N[n])])[0])


def test_kmeans_initialisation_finds_separated_clusters():
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x_ND = centres.repeat(50, 1) + 0.01 * torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    rvq = ResidualVectorQuantizer(1, 4, 2).train()
    torch.manual_seed(0)
    rvq(x_ND)
    assert bool(rvq.initialized)
    found = sorted(rvq.codebooks[0].tolist())
    for got, want in zip(found, sorted(centres.tolist())):
        assert got == pytest.approx(want, abs=0.01)


def test_ema_update_and_dead_code_restart_follow_their_formulas():
    decay, threshold = 0.9, 0.5
    rvq = quantizer(num_codebooks=1, codebook_size=4, dim=2, ema_decay=decay, dead_code_threshold=threshold)
    rvq.codebooks[0] = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]])
    counts_before = torch.tensor([4.0, 2.0, 1.0, 0.5])
    sums_before = rvq.codebooks[0] * counts_before[:, None]
    rvq.ema_counts[0], rvq.ema_sums[0] = counts_before, sums_before.clone()
    x_ND = torch.tensor([[0.5, 0.0], [-0.5, 1.0], [9.0, 0.0], [0.0, 11.0], [1.0, 1.0]])
    rvq.train()(x_ND)
    # by hand: rows 0, 1, 4 -> code 0; row 2 -> code 1; row 3 -> code 2; nothing -> code 3
    counts = torch.tensor([3.0, 1.0, 1.0, 0.0])
    sums = torch.stack([x_ND[[0, 1, 4]].sum(0), x_ND[2], x_ND[3], torch.zeros(2)])
    ema_counts = decay * counts_before + (1 - decay) * counts
    ema_sums = decay * sums_before + (1 - decay) * sums
    total = ema_counts.sum()
    smoothed = (ema_counts + 1e-5) / (total + 4 * 1e-5) * total
    torch.testing.assert_close(rvq.codebooks[0, :3], (ema_sums / smoothed[:, None])[:3])
    torch.testing.assert_close(rvq.ema_counts[0, :3], ema_counts[:3])
    # code 3's count fell to 0.45 < 0.5: restarted at one of the batch's rows, count 1
    assert float(ema_counts[3]) < threshold
    assert any(torch.equal(rvq.codebooks[0, 3], row) for row in x_ND)
    assert float(rvq.ema_counts[0, 3]) == 1.0 and torch.equal(rvq.ema_sums[0, 3], rvq.codebooks[0, 3])


def test_lookup_rejects_bad_codes():
    rvq = quantizer()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        rvq.lookup(torch.tensor([[8, 0, 0]]))
    with pytest.raises(ValueError, match="1 <= q <= 3"):
        rvq.lookup(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_codebooks"):
        rvq.quantize(torch.zeros(2, 4), num_codebooks=4)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------

TINY_TOKENIZER = {"hidden_dim": 16, "latent_dim": 8, "num_blocks": 2, "num_codebooks": 3, "codebook_size": 16}
TINY_VOCODER = {"dim": 16, "intermediate_dim": 32, "num_blocks": 2}


def test_tokenizer_encode_decode_is_the_decoder_of_the_summed_codewords():
    torch.manual_seed(0)
    tokenizer = MelTokenizer(TINY_TOKENIZER).eval()
    audio = torch.stack([sine(440.0), sine(880.0)])
    mel = tokenizer.front_end(audio)
    codes = tokenizer.encode(audio)
    assert codes.shape == (2, 3, CLIP_FRAMES) and torch.equal(codes, tokenizer.encode(mel))
    latent_BDT = tokenizer.encoder(mel)
    for b, t in ((0, 0), (1, 30)):
        assert codes[b, :, t].tolist() == tokenizer.quantizer.quantize(latent_BDT[b, :, t][None])[0].tolist()
    summed_BTD = sum(tokenizer.quantizer.codebooks[q][codes[:, q]] for q in range(3))
    torch.testing.assert_close(tokenizer.decode(codes), tokenizer.decoder(summed_BTD.transpose(1, 2)))
    first_two_BTD = summed_BTD - tokenizer.quantizer.codebooks[2][codes[:, 2]]
    torch.testing.assert_close(tokenizer.decode(codes[:, :2]), tokenizer.decoder(first_two_BTD.transpose(1, 2)))
    assert torch.equal(tokenizer.encode(audio, num_codebooks=1), codes[:, :1])
    with pytest.raises(ValueError, match=r"\[B, q, T\]"):
        tokenizer.decode(codes[0])
    with pytest.raises(ValueError, match=f"{N_MELS}"):
        tokenizer.encode(torch.zeros(1, 40, 10))


def test_tokenizer_and_vocoder_save_and_load_one_file(tmp_path):
    torch.manual_seed(0)
    tokenizer = MelTokenizer(TINY_TOKENIZER).eval()
    vocoder = MelVocoder(TINY_VOCODER).eval()
    mel = tokenizer.front_end(sine(300.0))
    tokenizer.save_pretrained(tmp_path / "tok.safetensors")
    vocoder.save_pretrained(tmp_path / "voc.safetensors")
    loaded_tokenizer = MelTokenizer.from_pretrained(tmp_path / "tok.safetensors")
    loaded_vocoder = MelVocoder.from_pretrained(tmp_path / "voc.safetensors")
    assert loaded_tokenizer.config == tokenizer.config and bool(loaded_tokenizer.quantizer.initialized) is False
    assert torch.equal(loaded_tokenizer.encode(mel), tokenizer.encode(mel))
    torch.testing.assert_close(loaded_vocoder(mel), vocoder(mel))
    # float16 files halve the size and load back as float32 (the values rounded to half precision)
    vocoder.save_pretrained(tmp_path / "voc16.safetensors", dtype=torch.float16)
    half = MelVocoder.from_pretrained(tmp_path / "voc16.safetensors")
    assert half.head.weight.dtype == torch.float32
    assert torch.equal(half.head.weight, vocoder.head.weight.half().float())
    assert sorted(tokenizer.state_dict()) == sorted(MelTokenizer(TINY_TOKENIZER).state_dict())  # no EMA stats
    assert not any("ema" in key or "window" in key or "fbank" in key for key in tokenizer.state_dict())
    with pytest.raises(ValueError, match="not a MelTokenizer file"):
        MelTokenizer.from_pretrained(tmp_path / "voc.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        vocoder.save_pretrained(tmp_path / "voc.pt")
    with pytest.raises(ValueError, match="unknown MelVocoderConfig"):
        MelVocoder({"width": 3})


# ----------------------------------------------------------------------------------------------------------
# Vocoders and the MR-STFT loss
# ----------------------------------------------------------------------------------------------------------


def test_vocoders_turn_t_frames_into_t_minus_one_hops_of_samples():
    mel = AudioFrontEnd()(torch.stack([sine(440.0), sine(660.0)]))
    neural = MelVocoder(TINY_VOCODER)
    assert neural(mel).shape == (2, CLIP_SAMPLES)
    assert neural(mel[0, :, :10]).shape == (1, 9 * HOP_LENGTH)
    griffin_lim = GriffinLimVocoder(n_iter=8)
    waveform = griffin_lim(mel)
    assert waveform.shape == (2, CLIP_SAMPLES)
    # the baseline gives back the sine's pitch, as finely as its STFT resolves it (half a 15.6 Hz bin)
    spectrum = np.abs(np.fft.rfft(waveform[0].double().numpy()))
    peak = np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE)[spectrum.argmax()]
    assert abs(peak - 440.0) <= SAMPLE_RATE / N_FFT / 2
    with pytest.raises(ValueError, match=r"\[80, T\]"):
        neural(torch.zeros(2, 3, 64, 10))


def test_untrained_vocoder_starts_from_the_least_squares_magnitude_of_the_baseline():
    mel = AudioFrontEnd()(torch.stack([sine(300.0), sine(2000.0)]))
    vocoder = MelVocoder(TINY_VOCODER)
    inverse_mel = GriffinLimVocoder().inverse_mel  # torchaudio's least squares (the baseline's)
    expected = inverse_mel(denormalize_log_mel(mel)).clamp_min(LOG_MEL_FLOOR)
    torch.testing.assert_close(vocoder.magnitude(mel), expected, **fp_tolerance(torch.float32, N_FFT, scale=10.0))


def test_vocoder_magnitude_is_the_least_squares_one_times_exp_of_the_head():
    torch.manual_seed(0)
    vocoder = MelVocoder(TINY_VOCODER)
    torch.nn.init.normal_(vocoder.head.weight, std=0.1)
    mel = AudioFrontEnd()(sine(500.0))
    with torch.no_grad():
        x = vocoder.embed_norm(vocoder.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in vocoder.blocks:
            x = block(x)
        correction = vocoder.head(vocoder.final_norm(x.transpose(1, 2))).transpose(1, 2)
        least_squares = torch.linalg.pinv(vocoder.front_end.mel_fbank.T) @ denormalize_log_mel(mel)
        expected = least_squares.clamp_min(LOG_MEL_FLOOR) * correction.exp()
    torch.testing.assert_close(vocoder.magnitude(mel), expected, **fp_tolerance(torch.float32, N_MELS, layers=4))
    # the waveform is Griffin-Lim of that magnitude: its own STFT magnitude is close to it where it is loud
    waveform = vocoder(mel, griffin_lim_iterations=16)
    own = torch.stft(waveform, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True).abs()
    loud = expected > 0.1 * expected.max()
    assert float(((own - expected).abs()[loud] / expected[loud]).median()) < 0.5


def numpy_stft_magnitude(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Centred (reflect-padded) Hann STFT magnitudes [bins, frames], floored as sqrt(max(|S|^2, 1e-7))."""
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = [padded[s : s + n_fft] * window for s in range(0, len(padded) - n_fft + 1, hop)]
    return np.sqrt(np.maximum(np.abs(np.fft.rfft(np.array(frames), axis=1)) ** 2, 1e-7)).T


def test_multi_resolution_stft_loss_by_its_formula():
    generator = torch.Generator().manual_seed(0)
    target = 0.3 * torch.randn(2, 4096, generator=generator)
    predicted = target + 0.1 * torch.randn(2, 4096, generator=generator)
    resolutions = ((256, 64, 256), (512, 128, 512))
    convergence, log_magnitude = multi_resolution_stft_loss(predicted, target, resolutions)
    sc, mag = [], []
    for n_fft, hop, _ in resolutions:
        s = np.stack([numpy_stft_magnitude(x, n_fft, hop) for x in target.double().numpy()])
        p = np.stack([numpy_stft_magnitude(x, n_fft, hop) for x in predicted.double().numpy()])
        sc.append(np.sqrt(((s - p) ** 2).sum()) / np.sqrt((s**2).sum()))
        mag.append(np.abs(np.log(s) - np.log(p)).mean())
    tolerance = fp_tolerance(torch.float32, 512, layers=2)
    assert float(convergence) == pytest.approx(np.mean(sc), rel=tolerance["rtol"])
    assert float(log_magnitude) == pytest.approx(np.mean(mag), rel=tolerance["rtol"])
    zero_sc, zero_mag = multi_resolution_stft_loss(target, target, resolutions)
    assert float(zero_sc) == 0.0 and float(zero_mag) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        multi_resolution_stft_loss(predicted[:, :100], target)
