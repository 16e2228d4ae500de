"""Audio data (moezoo.training.datasets.audio and .datamodules.audio): eSpeak speech, the documented speaker /
rate split, synthesised notes at their equal-tempered pitch, captions written and read back, sound folders,
the balanced mixed DataModule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from moezoo.encoders.audio import CLIP_SAMPLES, SAMPLE_RATE
from moezoo.training.datamodules.audio import (
    AudioFolderDataModule,
    MixedAudioDataModule,
    MusicDataModule,
    SpeechDataModule,
)
from moezoo.training.datasets.audio import (
    CHORD_ROOTS,
    ESPEAK_VARIANTS,
    ESPEAK_VOICES,
    LEAD_IN_SAMPLES,
    NOTE_RANGE,
    PEAK_LEVEL,
    SPEECH_RATES,
    TIMBRES,
    WORDS,
    AudioFolderDataset,
    MusicDataset,
    SpeechDataset,
    caption_vocabulary,
    caption_words,
    collate_audio_batch,
    espeak_synthesize,
    espeak_unavailable_reason,
    music_caption,
    music_sounds,
    parse_audio_caption,
    speak,
    speech_caption,
    speech_items,
    speech_speakers,
)

ESPEAK_MISSING = espeak_unavailable_reason()
needs_espeak = pytest.mark.skipif(ESPEAK_MISSING is not None, reason=f"eSpeak NG unavailable: {ESPEAK_MISSING}")


def peak_frequency(audio: torch.Tensor, rate: int = SAMPLE_RATE, fft_size: int = 1 << 18) -> tuple[float, float]:
    """(frequency of the largest peak of the zero-padded, Hann-windowed spectrum, its bin width in Hz)."""
    x = audio.double().numpy()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), fft_size))
    return float(np.fft.rfftfreq(fft_size, 1 / rate)[spectrum.argmax()]), rate / fft_size


# ----------------------------------------------------------------------------------------------------------
# Speech
# ----------------------------------------------------------------------------------------------------------


@needs_espeak
def test_espeak_says_a_word_as_one_placed_normalised_clip():
    samples, rate = espeak_synthesize("seven", "en-us", 175, 50)
    assert rate == 22_050 and samples.dtype == np.int16 and 0.3 * rate < len(samples) < 0.8 * rate
    clip = speak("seven", "en-us+f3", 150, 60)
    assert clip.shape == (CLIP_SAMPLES,) and clip.dtype == torch.float32
    assert float(clip.abs().max()) == pytest.approx(PEAK_LEVEL)
    loud = torch.nonzero(clip.abs() > 0.01 * PEAK_LEVEL)
    assert LEAD_IN_SAMPLES <= int(loud[0]) < LEAD_IN_SAMPLES + 0.02 * SAMPLE_RATE  # the word starts after 50 ms
    assert clip[:LEAD_IN_SAMPLES].abs().max() < 0.01 * PEAK_LEVEL  # silence before it
    assert torch.equal(clip, speak("seven", "en-us+f3", 150, 60))
    # another voice, rate or pitch is another sound; a slower rate a longer one
    assert not torch.equal(clip, speak("seven", "en-gb-x-rp+f3", 150, 60))
    assert not torch.equal(clip, speak("seven", "en-us+f3", 150, 40))
    slow, fast = (torch.nonzero(speak("seven", "en-us", r, 50).abs() > 0.01) for r in (130, 200))
    assert int(slow[-1] - slow[0]) > 1.3 * int(fast[-1] - fast[0])


@needs_espeak
def test_espeak_rejects_unknown_voices_and_bad_settings():
    with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
        espeak_synthesize("yes", "xx-nowhere")
    with pytest.raises(ValueError, match="rate"):
        espeak_synthesize("yes", rate=20)
    with pytest.raises(ValueError, match="pitch"):
        espeak_synthesize("yes", pitch=101)
    with pytest.raises(ValueError, match="non-empty"):
        espeak_synthesize(" ")


@needs_espeak
def test_every_word_fits_a_clip_at_the_slowest_rate_and_every_voice_speaks():
    slowest = min(min(rates) for rates in SPEECH_RATES.values())
    for word in WORDS:
        assert speak(word, "en-us", slowest, 50).abs().max() > 0
    for voice in ESPEAK_VOICES:
        for variant in ("m1", "f5"):
            assert len(espeak_synthesize("go", f"{voice}+{variant}")[0]) > 0


def test_speaker_split_is_the_documented_latin_square():
    generator, judge = speech_speakers("generator"), speech_speakers("judge")
    assert len(generator) == 72 and len(judge) == 24 and not set(generator) & set(judge)
    for i, voice in enumerate(ESPEAK_VOICES):
        for j, variant in enumerate(ESPEAK_VARIANTS):
            assert ((voice, variant) in judge) == ((i + j) % 4 == 0)
    for split in (generator, judge):  # every accent and every variant is in both splits
        assert {s.voice for s in split} == set(ESPEAK_VOICES) and {s.variant for s in split} == set(ESPEAK_VARIANTS)
    assert not set(SPEECH_RATES["generator"]) & set(SPEECH_RATES["judge"])
    with pytest.raises(ValueError, match="generator, judge"):
        speech_speakers("test")


def test_speech_items_cover_the_grid_with_seeded_pitches():
    items = speech_items("generator", seed=0)
    assert len(items) == 72 * 2 * 20 and len(speech_items("judge")) == 24 * 3 * 20
    assert {(i.speaker, i.rate, i.word) for i in items} == {
        (s, r, w) for s in speech_speakers("generator") for r in SPEECH_RATES["generator"] for w in WORDS}
    assert items == speech_items("generator", seed=0)
    assert [i.pitch for i in items] != [i.pitch for i in speech_items("generator", seed=1)]
    assert 30 <= min(i.pitch for i in items) and max(i.pitch for i in items) <= 70
    assert {i.word for i in speech_items("judge", words=["yes", "no"])} == {"yes", "no"}
    with pytest.raises(ValueError, match="subset"):
        speech_items(words=["maybe"])


@needs_espeak
def test_speech_datamodule_splits_clips_deterministically():
    data = SpeechDataModule(words=["yes", "no"], batch_size=4, val_fraction=0.25, seed=3)
    data.setup()
    train, val = data.train_set.items, data.val_set.items
    assert len(train) + len(val) == 72 * 2 * 2 and len(val) == 72 and not set(train) & set(val)
    again = SpeechDataModule(words=["yes", "no"], val_fraction=0.25, seed=3)
    again.setup()
    assert again.val_set.items == val
    batch = next(iter(data.val_dataloader()))
    assert batch["audio"].shape == (4, CLIP_SAMPLES) and batch["domain"] == ["speech"] * 4
    assert [WORDS[label] for label in batch["label"].tolist()] == [parse_audio_caption(c)["word"]
                                                                   for c in batch["caption"]]
    assert torch.equal(batch["audio"][0], SpeechDataset([val[0]])[0]["audio"])


# ----------------------------------------------------------------------------------------------------------
# Music
# ----------------------------------------------------------------------------------------------------------


def test_a_note_sounds_at_its_equal_tempered_pitch_in_every_timbre():
    dataset = MusicDataset(renditions=1, seed=0, kinds=["note"])
    low, high = NOTE_RANGE
    assert len(dataset) == (high - low + 1) * len(TIMBRES)
    for i in range(0, len(dataset), 3):  # every timbre, notes across the range
        sound_id, timbre = dataset.describe(i)
        midi = music_sounds()[sound_id].midi[0]
        frequency, bin_width = peak_frequency(dataset[i]["audio"])
        assert abs(frequency - 440 * 2 ** ((midi - 69) / 12)) <= 2 * bin_width, (timbre, midi)


def test_a_sine_chord_has_its_three_tones_as_its_three_peaks():
    dataset = MusicDataset(renditions=1, timbres=["sine"], kinds=["chord"])
    for i in range(len(dataset)):
        sound = music_sounds()[dataset.describe(i)[0]]
        x = dataset[i]["audio"].double().numpy()
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), 1 << 18))
        freqs = np.fft.rfftfreq(1 << 18, 1 / SAMPLE_RATE)
        is_peak = (spectrum[1:-1] > spectrum[:-2]) & (spectrum[1:-1] > spectrum[2:])
        peaks = freqs[1:-1][is_peak][np.argsort(spectrum[1:-1][is_peak])[-3:]]
        want = [440 * 2 ** ((m - 69) / 12) for m in sound.midi]
        assert np.allclose(sorted(peaks), want, atol=2 * SAMPLE_RATE / (1 << 18)), (sound, sorted(peaks))


def test_music_clips_are_deterministic_by_seed_and_rendition():
    a, b = MusicDataset(2, seed=5), MusicDataset(2, seed=5)
    for i in (0, 7, 150):
        assert torch.equal(a[i]["audio"], b[i]["audio"])
    combinations = len(music_sounds()) * len(TIMBRES)
    later = MusicDataset(1, seed=5, first_rendition=1)
    assert torch.equal(later[3]["audio"], a[combinations + 3]["audio"])
    assert not torch.equal(MusicDataset(1, seed=6)[0]["audio"], a[0]["audio"])
    item = a[0]
    assert item["audio"].shape == (CLIP_SAMPLES,) and float(item["audio"].abs().max()) == pytest.approx(PEAK_LEVEL)
    assert item["audio"][:LEAD_IN_SAMPLES].abs().max() == 0 and item["domain"] == "music"
    assert item["caption"] == music_caption(music_sounds()[item["label"]], a.describe(0)[1])
    with pytest.raises(ValueError, match="subset"):
        MusicDataset(1, timbres=["violin"])


def test_music_datamodule_validates_on_later_renditions():
    data = MusicDataModule(renditions=2, val_renditions=1, timbres=["sine"], kinds=["note"], batch_size=8)
    data.setup()
    assert len(data.train_set) == 48 and len(data.val_set) == 24 and data.val_set.first_rendition == 2


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------


def test_every_caption_reads_back_as_what_it_says():
    for word in WORDS:
        assert parse_audio_caption(speech_caption(word)) == {"domain": "speech", "word": word}
    for sound in music_sounds():
        for timbre in TIMBRES:
            parsed = parse_audio_caption(music_caption(sound, timbre))
            assert parsed["domain"] == "music" and parsed["kind"] == sound.kind and parsed["timbre"] == timbre
            assert parsed["midi"] == list(sound.midi)
    assert music_caption(music_sounds()[12], "plucked") == "a plucked C4 note"
    chord = next(s for s in music_sounds() if s.kind == "chord" and s.root == "C" and s.quality == "major")
    assert music_caption(chord, "square") == "a C major chord on a square wave"
    assert parse_audio_caption("a C major chord on a square wave") == {
        "domain": "music", "kind": "chord", "timbre": "square", "root": "C", "quality": "major",
        "midi": [60, 64, 67]}
    assert parse_audio_caption("a plucked C4 note") == {
        "domain": "music", "kind": "note", "timbre": "plucked", "pitch": "C4", "midi": [60]}


def test_captions_read_regardless_of_case_punctuation_and_articles():
    assert parse_audio_caption("The word  SEVEN!") == {"domain": "speech", "word": "seven"}
    assert parse_audio_caption("word on")["word"] == "on"
    assert parse_audio_caption("Sawtooth a#3 note.")["midi"] == [58]
    assert parse_audio_caption("an A minor chord on a plucked string")["midi"] == [69, 72, 76]


@pytest.mark.parametrize("text, message", [
    ("the word maybe", "unknown word 'maybe'"),
    ("a violin C4 note", "unknown timbre 'violin'"),
    ("a sine C6 note", "outside the notes of the data"),
    ("a sine Db4 note", "cannot read"),
    ("a B major chord on a sine wave", "unknown chord root 'B'"),
    ("a C diminished chord on a sine wave", "unknown chord quality"),
    ("a C major chord on a trumpet", "cannot read"),
    ("a C major chord on a wooden flute", "unknown instrument"),
    ("play something nice", "cannot read"),
])
def test_bad_captions_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_audio_caption(text)


def test_the_vocabulary_holds_every_caption_word():
    vocabulary = set(caption_vocabulary())
    assert caption_words("a plucked C#4 note") == ["a", "plucked", "c#4", "note"]
    assert set(WORDS) | {"the", "word", "chord", "major", "minor", "wave", "string", "c4", "c#3"} <= vocabulary
    assert {r.lower() for r in CHORD_ROOTS} <= vocabulary and "b" not in vocabulary
    assert len(vocabulary) == 62  # 20 words + the word/the + 24 notes + 6 roots + 4 timbres + 6 others
    assert list(caption_vocabulary()) == sorted(vocabulary)


# ----------------------------------------------------------------------------------------------------------
# Folders and the mixed DataModule
# ----------------------------------------------------------------------------------------------------------


def test_folder_clips_are_read_mixed_resampled_and_fitted(tmp_path):
    t = np.arange(int(2.0 * 22_050)) / 22_050
    stereo = np.stack([0.5 * np.sin(2 * math.pi * 440 * t), 0.3 * np.sin(2 * math.pi * 440 * t)], axis=1)
    soundfile.write(tmp_path / "long.wav", stereo, 22_050)
    (tmp_path / "long.txt").write_text(" a sine A4 note \n")
    soundfile.write(tmp_path / "short.FLAC", 0.2 * np.ones(4000), SAMPLE_RATE)
    soundfile.write(tmp_path / ".hidden.wav", np.zeros(100), SAMPLE_RATE)
    (tmp_path / "notes.md").write_text("not audio")
    data = AudioFolderDataModule(tmp_path, domain="music", val_fraction=0.0, batch_size=2)
    data.setup()
    assert [p.name for p in data.train_set.files] == ["long.wav", "short.FLAC"] and data.val_set is None
    long, short = data.train_set[0], data.train_set[1]
    assert long["caption"] == "a sine A4 note" and short["caption"] == "" and long["domain"] == "music"
    assert long["audio"].shape == short["audio"].shape == (CLIP_SAMPLES,) and long["label"] == -1
    frequency, bin_width = peak_frequency(long["audio"])
    assert abs(frequency - 440.0) <= 2 * bin_width  # resampled from 22 050 Hz to 16 kHz, pitch kept
    assert float(long["audio"][2000:-2000].abs().max()) == pytest.approx(0.4, abs=0.01)  # the channels' mean
    # the file (FLAC's default 16-bit samples: within one quantisation step), then zeros
    torch.testing.assert_close(short["audio"][:4000], torch.full((4000,), 0.2), rtol=0, atol=2**-15)
    assert short["audio"][4000:].abs().max() == 0
    torch.manual_seed(0)
    cropped = AudioFolderDataset([tmp_path / "long.wav"], clip_samples=1000, random_crop=True)[0]["audio"]
    assert cropped.shape == (1000,)
    batch = next(iter(data.train_dataloader()))
    assert batch["audio"].shape == (2, CLIP_SAMPLES) and sorted(batch["caption"]) == ["", "a sine A4 note"]


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AudioFolderDataModule(tmp_path / "nowhere").setup()
    with pytest.raises(FileNotFoundError, match="no sound files"):
        AudioFolderDataModule(tmp_path).setup()
    with pytest.raises(ValueError, match="domain"):
        AudioFolderDataModule(tmp_path, domain="noise")
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="cannot read"):
        AudioFolderDataset([tmp_path / "broken.wav"])[0]


@needs_espeak
def test_mixed_datamodule_balances_the_domains():
    data = MixedAudioDataModule(per_domain=10, val_per_domain=4, words=["up", "down"], music_renditions=1,
                                music_val_renditions=1, batch_size=28, seed=1)
    data.setup()
    train = [data.train_set[i] for i in range(len(data.train_set))]
    assert [s["domain"] for s in train] == ["speech"] * 10 + ["music"] * 10
    assert len(data.val_set) == 8
    again = MixedAudioDataModule(per_domain=10, val_per_domain=4, words=["up", "down"], music_renditions=1,
                                 music_val_renditions=1, seed=1)
    again.setup()
    assert [again.train_set[i]["caption"] for i in range(20)] == [s["caption"] for s in train]
    cached = MixedAudioDataModule(per_domain=10, val_per_domain=4, words=["up", "down"], music_renditions=1,
                                  music_val_renditions=1, seed=1, cache=True)
    cached.setup()
    assert all(torch.equal(cached.train_set[i]["audio"], train[i]["audio"]) for i in (0, 19))
    assert cached.train_set[0] is cached.train_set[0]  # made once, then kept
    batch = collate_audio_batch(train[8:12])
    assert batch["domain"] == ["speech", "speech", "music", "music"] and batch["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="more clips than a domain has"):
        MixedAudioDataModule(per_domain=10_000, words=["up"], music_renditions=1).setup()
    with pytest.raises(ValueError, match="per_domain"):
        MixedAudioDataModule(per_domain=0)
