"""Does the audio model say the word and play the note asked for? Words read by a judge trained on real speech
only, notes by their F0, chords by their pitch classes; first on real clips and through the codec and vocoders
(the ceilings), then on generated clips.

    python bench/audio_quality.py ceiling          # no language model: real clips, real -> tokenizer -> vocoders
    python bench/audio_quality.py generated --model local-dir:runs/unimoe_audio_stage3/export
    python bench/audio_quality.py all --compare moe=local-dir:runs/unimoe_audio_stage3/export \\
        dense=local-dir:runs/unimoe_audio_dense/export scratch=local-dir:runs/unimoe_audio_scratch/export \\
        --json bench/results/audio_quality.json

Everything runs on one torch thread (another training may share the CPU).

The word judge
--------------
A small log-mel CNN (``moezoo.training.audio_metrics.WordJudge``) trained on real eSpeak clips of the "judge"
split only (24 speakers x 130, 165, 200 wpm x 20 words; ``speech_items("judge")``): voices and rates the
generator never hears. Its accuracy is printed first, on every clip of the "generator" split (72 other
speakers x 150, 185 wpm: 2880 clips), so you see how far to trust it. Training draws a time shift of up to
+-100 ms and a gain of up to +-10 dB per clip; on the same clips it is deterministic by ``--judge-seed``. eSpeak
itself is not: the same word, voice, rate and pitch come out a little different from call to call (a few
samples longer or shorter, another waveform), so the judge is cached in ``bench/results/audio_judge/`` under a
hash of its recipe and a re-run loads it instead of training again (``--retrain-judge`` forces it; about 1.5
minutes on one thread).

Notes and chords (``moezoo.training.audio_metrics``; its docstring has the exact definitions and the
measurements behind each constant): a note is right when the median YIN F0 over its sounding, periodic frames is
within +-50 cents of the prompted note (an unpitched clip is wrong); the median |error| counts unpitched clips as
infinitely wrong. A chord scores the F1 of the pitch classes heard in its chroma (classes within 6 dB of the
strongest) against the prompted triad's.

Reference clips and ceilings
----------------------------
Speech: ``--ceiling-speech`` clips of the generator split (a seeded choice). Music: every note and chord in
every timbre, ``--music-renditions`` renditions of seed ``--music-seed`` (the generator trains on seed 0).
Each row reads them after a path: as they are; log-mel -> Griffin-Lim / the neural vocoder; the tokenizer
(``--codec``, the first ``--codebooks`` codebooks) -> Griffin-Lim / the neural vocoder (``--vocoder``); and, for
each model, its own codec and vocoder. Rows whose file is missing are skipped with a note.

Generated clips
---------------
Each of the 20 words ("the word seven") with ``--word-seeds`` seeds and every note and chord caption in every
timbre ("a plucked C4 note", "a C major chord on a square wave": all 144) with ``--music-seeds`` seeds; prompt
``i`` of repetition ``r`` uses ``torch.Generator().manual_seed(--seed + r)``. Real-time factor: wall-clock of
the pipeline calls (``--batch`` prompts per call, routing recorded) / seconds of audio made.

Routing (DCMoE models): experts per token (routed + null) of every generated frame from the pipeline's
``return_routing``, by domain and by layer. The null expert is read from one teacher-forced pass of the model
over the prompt and the generated codes (``teacher_forced_routing``; its expert counts are checked against
the pipeline's, "agreement"). A frame is silent when the generated clip's energy in that frame's window is
40 dB under its loudest frame or under -60 dBFS (``silent_frames``); the null-expert rate is the share of
(frame, layer) pairs whose chosen experts include the null expert, on silent and on sounding frames.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moezoo.encoders.audio import SAMPLE_RATE, AudioFrontEnd, GriffinLimVocoder, MelTokenizer, MelVocoder
from moezoo.pipelines.audio import AudioPipeline
from moezoo.pipelines.base import checked_guidance_scale
from moezoo.training.audio_metrics import (
    CENTS_TOLERANCE,
    WordJudge,
    cents_error,
    heard_pitch_classes,
    median_f0,
    pitch_class_f1,
    silent_frames,
    teacher_forced_routing,
)
from moezoo.training.datasets.audio import (
    TIMBRES,
    WORDS,
    MusicDataset,
    SpeechDataset,
    midi_to_hz,
    music_caption,
    music_sounds,
    parse_audio_caption,
    speech_caption,
    speech_items,
)
from moezoo.zoo.hub import atomic_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CODEC = REPO / "runs" / "audio_tokenizer" / "mel_tokenizer.safetensors"
DEFAULT_VOCODER = REPO / "runs" / "audio_vocoder" / "mel_vocoder.safetensors"
DEFAULT_RESULTS = REPO / "bench" / "results"
#: How the judge is trained; a change here (bump "version" for a change of code) makes a new cache entry.
JUDGE_RECIPE = {"version": 1, "width": 32, "batch_size": 64, "peak_lr": 3e-3, "weight_decay": 0.01,
                "label_smoothing": 0.1, "max_shift_ms": 100, "gain_db": 10.0}
CHUNK = 32  # clips per forward when reading or transforming reference clips


# ----------------------------------------------------------------------------------------------------------
# The word judge
# ----------------------------------------------------------------------------------------------------------


def speech_clips(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of a speech split ``[N, CLIP_SAMPLES]`` and its word index ``[N]``."""
    dataset = SpeechDataset(speech_items(split, seed))
    audio = torch.stack([dataset[i]["audio"] for i in tqdm(range(len(dataset)), desc=f"eSpeak, {split} split",
                                                          leave=False)])
    return audio, torch.tensor([WORDS.index(item.word) for item in dataset.items])


def augmented(audio_BS: torch.Tensor, recipe: dict, generator: torch.Generator) -> torch.Tensor:
    """Each clip moved by a whole number of samples in +-max_shift_ms (zeros fill) and scaled by a gain in
    +-gain_db, both uniform."""
    limit = int(recipe["max_shift_ms"] * SAMPLE_RATE / 1000)
    shifts = torch.randint(-limit, limit + 1, (len(audio_BS),), generator=generator).tolist()
    gains = 10 ** ((torch.rand(len(audio_BS), 1, generator=generator) * 2 - 1) * recipe["gain_db"] / 20)
    out = torch.zeros_like(audio_BS)
    length = audio_BS.shape[1]
    for row, shift in enumerate(shifts):
        if shift >= 0:
            out[row, shift:] = audio_BS[row, : length - shift]
        else:
            out[row, :shift] = audio_BS[row, -shift:]
    return out * gains


def train_word_judge(audio_NS: torch.Tensor, labels_N: torch.Tensor, recipe: dict, epochs: int,
                     seed: int) -> WordJudge:
    """AdamW with a one-cycle schedule and label smoothing over augmented real clips."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = WordJudge(len(WORDS), recipe["width"])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=recipe["peak_lr"], weight_decay=recipe["weight_decay"])
    batch = recipe["batch_size"]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe["peak_lr"],
                                                   total_steps=epochs * math.ceil(len(labels_N) / batch))
    judge.train()
    for _ in tqdm(range(epochs), desc="training the word judge", leave=False):
        order = torch.randperm(len(labels_N), generator=generator)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            logits = judge(augmented(audio_NS[idx], recipe, generator))
            loss = F.cross_entropy(logits, labels_N[idx], label_smoothing=recipe["label_smoothing"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return judge.eval()


def judge_settings(epochs: int, seed: int, data_seed: int) -> dict:
    """Everything the trained judge depends on: the recipe, and which clips and seeds."""
    return {**JUDGE_RECIPE, "epochs": epochs, "seed": seed, "data": f"speech_items('judge', {data_seed})",
            "words": list(WORDS)}


def judge_cache_path(results_dir: Path, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(results_dir) / "audio_judge" / f"word_judge_{key}.safetensors"


def save_judge(judge: WordJudge, path: Path, settings: dict) -> None:
    with atomic_path(Path(path)) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp),
                                    metadata={"settings": json.dumps(settings, sort_keys=True)})
        tmp.chmod(0o644)  # the temporary file is private; the cache is not


def load_judge(path: Path, settings: dict) -> WordJudge:
    """The judge cached at ``path``; a ValueError if it was trained with other settings."""
    with safetensors.safe_open(str(path), framework="pt") as file:
        stored = json.loads((file.metadata() or {}).get("settings", "null"))
    if stored != settings:
        raise ValueError(f"{path} holds a judge trained with {stored}, not {settings}: delete it or --retrain-judge")
    judge = WordJudge(len(WORDS), settings["width"])
    judge.load_state_dict(safetensors.torch.load_file(str(path)))
    return judge.eval()


@torch.no_grad()
def judged_words(judge: WordJudge, audio: torch.Tensor | list) -> np.ndarray:
    """The judge's word index for each clip (a tensor ``[N, S]`` or a list of 1-D clips of one length)."""
    clips = torch.as_tensor(np.stack(audio)) if isinstance(audio, list) else audio
    return torch.cat([judge(clips[i : i + 256].float()).argmax(1) for i in range(0, len(clips), 256)]).numpy()


def fit_judge(args) -> tuple[WordJudge, dict]:
    """The cached judge, or a freshly trained one; and its accuracy on the generator split's real clips."""
    settings = judge_settings(args.judge_epochs, args.judge_seed, args.data_seed)
    path = judge_cache_path(args.results_dir, settings)
    train_audio, train_labels = speech_clips("judge", args.data_seed)
    began = time.perf_counter()
    if path.is_file() and not args.retrain_judge:
        judge, how = load_judge(path, settings), f"loaded from {path}"
    else:
        judge = train_word_judge(train_audio, train_labels, JUDGE_RECIPE, args.judge_epochs, args.judge_seed)
        save_judge(judge, path, settings)
        how = f"trained in {time.perf_counter() - began:.0f} s ({args.judge_epochs} epochs), saved to {path}"
    test_audio, test_labels = speech_clips("generator", args.data_seed)
    right = judged_words(judge, test_audio) == test_labels.numpy()
    per_word = {w: float(right[test_labels.numpy() == i].mean()) for i, w in enumerate(WORDS)}
    info = {"path": str(path), "how": how, "train_clips": len(train_labels), "held_out_clips": len(test_labels),
            "held_out_accuracy": float(right.mean()), "held_out_per_word": per_word}
    return judge, info


# ----------------------------------------------------------------------------------------------------------
# Reference clips and what the metrics read on a set of clips
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClipSet:
    """Clips to read, one list per kind, and what each was meant to be."""

    speech: list[np.ndarray]
    words: list[int]  # WORDS index
    notes: list[np.ndarray]
    note_midi: list[int]
    note_timbres: list[str]
    chords: list[np.ndarray]
    chord_midi: list[tuple[int, ...]]
    chord_timbres: list[str]


def reference_clips(args) -> ClipSet:
    """``--ceiling-speech`` generator-split clips (seeded choice) and every music sound x timbre rendered
    ``--music-renditions`` times with ``--music-seed``."""
    dataset = SpeechDataset(speech_items("generator", args.data_seed))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[: args.ceiling_speech]
    music = MusicDataset(args.music_renditions, seed=args.music_seed)
    described = [(music.describe(i), music[i]["audio"].numpy()) for i in range(len(music))]
    sounds = music_sounds()
    notes = [(sounds[s].midi[0], t, a) for (s, t), a in described if sounds[s].kind == "note"]
    chords = [(sounds[s].midi, t, a) for (s, t), a in described if sounds[s].kind == "chord"]
    return ClipSet(speech=[dataset[int(i)]["audio"].numpy() for i in chosen],
                   words=[WORDS.index(dataset.items[int(i)].word) for i in chosen],
                   notes=[a for _, _, a in notes], note_midi=[m for m, _, _ in notes],
                   note_timbres=[t for _, t, _ in notes],
                   chords=[a for _, _, a in chords], chord_midi=[m for m, _, _ in chords],
                   chord_timbres=[t for _, t, _ in chords])


def read_clips(judge: WordJudge, clips: ClipSet) -> dict:
    """Word accuracy, note pitch errors and chord F1s of a clip set, with breakdowns."""
    result = {}
    if clips.speech:
        right = judged_words(judge, clips.speech) == np.array(clips.words)
        result["word_accuracy"] = float(right.mean())
        result["per_word"] = {w: float(right[np.array(clips.words) == i].mean()) for i, w in enumerate(WORDS)
                              if i in clips.words}
    if clips.notes:
        cents = np.array([cents_error(median_f0(a), midi_to_hz(m)) for a, m in zip(clips.notes, clips.note_midi)])
        within = np.abs(cents) <= CENTS_TOLERANCE  # NaN (no pitch) is not within
        result["notes_within_50_cents"] = float(within.mean())
        result["median_abs_cents"] = float(np.median(np.where(np.isnan(cents), np.inf, np.abs(cents))))
        result["unpitched_notes"] = int(np.isnan(cents).sum())
        result["notes_within_50_cents_per_timbre"] = {
            t: float(within[np.array(clips.note_timbres) == t].mean()) for t in TIMBRES if t in clips.note_timbres}
    if clips.chords:
        f1 = np.array([pitch_class_f1(heard_pitch_classes(a), m) for a, m in zip(clips.chords, clips.chord_midi)])
        result["chord_f1"] = float(f1.mean())
        result["chord_f1_per_timbre"] = {t: float(f1[np.array(clips.chord_timbres) == t].mean()) for t in TIMBRES
                                         if t in clips.chord_timbres}
    return result


@torch.no_grad()
def transformed(clips: ClipSet, path) -> ClipSet:
    """Every clip through ``path`` (``[B, S]`` audio -> ``[B, S']`` audio), in chunks."""

    def run(audios: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(audios), CHUNK):
            batch = torch.from_numpy(np.stack(audios[i : i + CHUNK]))
            out += list(path(batch).float().clamp(-1, 1).numpy())
        return out

    return ClipSet(run(clips.speech), clips.words, run(clips.notes), clips.note_midi, clips.note_timbres,
                   run(clips.chords), clips.chord_midi, clips.chord_timbres)


def through(*steps):
    """One audio -> audio path of successive steps."""

    def path(audio: torch.Tensor) -> torch.Tensor:
        for step in steps:
            audio = step(audio)
        return audio

    return path


def file_ceiling_paths(args, tokenizer: MelTokenizer | None, vocoder: MelVocoder | None) -> list[tuple[str, object]]:
    """(name, audio -> audio) of the reference paths the tokenizer and vocoder files allow: real clips, and each
    mel (the log-mel, the tokenizer's decoding of its first q codebooks) through each vocoder."""
    mels = [("log-mel", AudioFrontEnd())]
    for q in args.codebooks if tokenizer is not None else ():
        encode = partial(tokenizer.encode, num_codebooks=q)
        mels.append((f"tokenizer ({q} codebooks)", through(encode, tokenizer.decode)))
    vocoders = [("Griffin-Lim", GriffinLimVocoder(args.griffin_lim_iters))]
    if vocoder is not None:
        vocoders.append(("neural vocoder", vocoder))
    return [("real clips", through())] + [(f"real -> {mel_name} -> {vocoder_name}", through(to_mel, to_audio))
                                         for mel_name, to_mel in mels for vocoder_name, to_audio in vocoders]


def model_ceiling_path(label: str, model) -> tuple[str, object]:
    """Real clips through a model's own codec (all its codebooks) and vocoder."""
    return (f"real -> {label}'s codec ({model.codec.num_codebooks} codebooks) + vocoder",
            through(model.codec.encode, model.decode_audio))


# ----------------------------------------------------------------------------------------------------------
# Generated clips
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    text: str
    domain: str
    repetition: int


def generation_prompts(word_seeds: int, music_seeds: int) -> list[Prompt]:
    """Every word ``word_seeds`` times, then every music caption (sound x timbre) ``music_seeds`` times."""
    prompts = [Prompt(speech_caption(w), "speech", r) for r in range(word_seeds) for w in WORDS]
    return prompts + [Prompt(music_caption(sound, timbre), "music", r) for r in range(music_seeds)
                      for sound in music_sounds() for timbre in TIMBRES]


def prompt_targets(prompts: list[Prompt], audios: list[np.ndarray]) -> ClipSet:
    """The generated clips sorted by what their prompts ask for."""
    clips = ClipSet([], [], [], [], [], [], [], [])
    for prompt, audio in zip(prompts, audios):
        asked = parse_audio_caption(prompt.text)
        if asked["domain"] == "speech":
            clips.speech.append(audio)
            clips.words.append(WORDS.index(asked["word"]))
        elif asked["kind"] == "note":
            clips.notes.append(audio)
            clips.note_midi.append(asked["midi"][0])
            clips.note_timbres.append(asked["timbre"])
        else:
            clips.chords.append(audio)
            clips.chord_midi.append(tuple(asked["midi"]))
            clips.chord_timbres.append(asked["timbre"])
    return clips


def generate(pipe, prompts: list[Prompt], args) -> dict:
    """Generate every prompt; the audio, the pipeline's experts per frame and layer, the teacher-forced null
    expert use and each clip's silent frames; and the seconds spent in the pipeline."""
    audios, experts, forced, silent, seconds = [], [], [], [], 0.0
    for start in tqdm(range(0, len(prompts), args.batch), desc="generating", leave=False):
        part = prompts[start : start + args.batch]
        generators = [torch.Generator().manual_seed(args.seed + p.repetition) for p in part]
        began = time.perf_counter()
        out = pipe([p.text for p in part], num_tokens=args.frames, guidance_scale=args.guidance,
                   temperature=args.temperature, top_k=args.top_k, generator=generators, return_routing=True)
        seconds += time.perf_counter() - began
        audios += out.audios
        silent += [silent_frames(a) for a in out.audios]
        if out.experts_per_token:
            experts.append(np.stack(out.experts_per_token))  # [layers, B, T]
            layers = teacher_forced_routing(pipe.model, pipe.model.tokenize([p.text for p in part]),
                                            torch.from_numpy(out.codes))
            forced.append({key: np.stack([layer[key].numpy() for layer in layers]) for key in ("experts", "null")})
    routing = None
    if experts:
        routing = {"experts": np.concatenate(experts, axis=1),
                   "forced_experts": np.concatenate([f["experts"] for f in forced], axis=1),
                   "null": np.concatenate([f["null"] for f in forced], axis=1)}
    return {"audios": audios, "silent": np.stack(silent), "routing": routing, "seconds": seconds}


def routing_summary(prompts: list[Prompt], generated: dict) -> dict | None:
    """Experts per token by domain and layer, on silent frames, and the null-expert rate on silent and on
    sounding frames (per layer and over all layers)."""
    routing = generated["routing"]
    if routing is None:
        return None
    experts_LBT, null_LBT, silent_BT = routing["experts"], routing["null"], generated["silent"]
    if silent_BT.shape != experts_LBT.shape[1:]:
        raise RuntimeError(f"{silent_BT.shape[1]} silence frames per clip against {experts_LBT.shape[2]} tokens")
    domains = np.array([p.domain for p in prompts])
    sounding_BT = ~silent_BT

    def rate(values_LBT, mask_BT) -> list[float | None]:
        return [float(v[mask_BT].mean()) if mask_BT.any() else None for v in values_LBT]

    by_domain = {d: rate(experts_LBT, np.broadcast_to((domains == d)[:, None], silent_BT.shape)) for d in set(domains)}
    return {
        "experts_per_token_by_layer": by_domain,
        "experts_per_token": {d: float(np.mean(v)) for d, v in by_domain.items()},
        "experts_per_token_silent_by_layer": rate(experts_LBT, silent_BT),
        "null_rate_silent_by_layer": rate(null_LBT, silent_BT),
        "null_rate_sounding_by_layer": rate(null_LBT, sounding_BT),
        "null_rate_silent": float(null_LBT[:, silent_BT].mean()) if silent_BT.any() else None,
        "null_rate_sounding": float(null_LBT[:, sounding_BT].mean()) if sounding_BT.any() else None,
        "silent_frame_share": {d: float(silent_BT[domains == d].mean()) for d in set(domains)},
        "routed_experts_per_token": float((routing["forced_experts"] - null_LBT).mean()),
        "teacher_forced_agreement": float((routing["forced_experts"] == experts_LBT).mean()),
    }


def bench_model(label: str, pipe, judge: WordJudge, prompts: list[Prompt], args) -> dict:
    generated = generate(pipe, prompts, args)
    scores = read_clips(judge, prompt_targets(prompts, generated["audios"]))
    audio_seconds = sum(len(a) for a in generated["audios"]) / pipe.sampling_rate
    routing = routing_summary(prompts, generated)
    model = pipe.model
    routed = routing["routed_experts_per_token"] if routing else None
    return {"model": label, "params": model.num_parameters(),
            "active_params": model.num_parameters(active=True, experts_per_token=routed) if routed is not None
            else model.num_parameters(),
            "clips": len(prompts), "rtf": generated["seconds"] / audio_seconds, **scores, "routing": routing}


# ----------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------


def percent(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def cents_text(value) -> str:
    return "—" if value is None else "n/a" if math.isinf(value) else f"{value:.1f}"


def print_ceilings(rows: list[dict], clips: ClipSet) -> None:
    print(f"Ceilings: {len(clips.speech)} real speech clips (generator split), {len(clips.notes)} notes and "
          f"{len(clips.chords)} chords (every sound x timbre)\n")
    print("| path | words judged right | notes within ±50 cents | median abs error (cents) | chord pitch-class F1 |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['path']} | {percent(row.get('word_accuracy'))} | {percent(row.get('notes_within_50_cents'))} "
              f"| {cents_text(row.get('median_abs_cents'))} | {row.get('chord_f1', math.nan):.3f} |")
    print()


def print_models(rows: list[dict], args) -> None:
    print(f"Generated: the 20 words x {args.word_seeds} seed(s), 144 note/chord captions x {args.music_seeds} seed(s); "
          f"guidance {args.guidance}, temperature {args.temperature}, top-k {args.top_k or 'all'}, "
          f"{args.batch} prompt(s) per call, 1 thread\n")
    print("| model | params (M) | active (M) | words judged right | notes within ±50 cents | median abs error "
          "(cents) | chord pitch-class F1 | real-time factor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['params'] / 1e6:.2f} | {row['active_params'] / 1e6:.2f} | "
              f"{percent(row['word_accuracy'])} | {percent(row['notes_within_50_cents'])} | "
              f"{cents_text(row['median_abs_cents'])} | {row['chord_f1']:.3f} | {row['rtf']:.3f} |")
    print()
    for row in rows:
        words = ", ".join(f"{w} {a:.0%}" for w, a in row["per_word"].items())
        notes = ", ".join(f"{t} {a:.0%}" for t, a in row["notes_within_50_cents_per_timbre"].items())
        chords = ", ".join(f"{t} {a:.2f}" for t, a in row["chord_f1_per_timbre"].items())
        print(f"{row['model']}: words: {words}; notes within ±50 cents by timbre: {notes} "
              f"({row['unpitched_notes']} unpitched); chord F1 by timbre: {chords}")
    print()
    for row in rows:
        routing = row["routing"]
        if routing is None:
            print(f"{row['model']}: dense FFNs, no routing\n")
            continue
        print(f"{row['model']}: mean experts per token (routed + null) speech "
              f"{routing['experts_per_token'].get('speech', math.nan):.2f}, music "
              f"{routing['experts_per_token'].get('music', math.nan):.2f}; routed only "
              f"{routing['routed_experts_per_token']:.2f}; null-expert rate on silent frames "
              f"{percent(routing['null_rate_silent'])}, on sounding frames {percent(routing['null_rate_sounding'])}; "
              f"silent frames: " + ", ".join(f"{d} {s:.0%}" for d, s in sorted(routing["silent_frame_share"].items()))
              + f"; teacher-forced counts agree with the pipeline's on {routing['teacher_forced_agreement']:.1%}\n")
        print("| layer | experts/token, speech | experts/token, music | experts/token, silent frames "
              "| null rate, silent frames | null rate, sounding frames |")
        print("|---:|---:|---:|---:|---:|---:|")
        by_layer = routing["experts_per_token_by_layer"]
        for i in range(len(routing["null_rate_silent_by_layer"])):
            cells = [by_layer.get(d, [None] * (i + 1))[i] for d in ("speech", "music")]
            silent = routing["experts_per_token_silent_by_layer"][i]
            print(f"| {i} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in (*cells, silent)) +
                  f" | {percent(routing['null_rate_silent_by_layer'][i])} | "
                  f"{percent(routing['null_rate_sounding_by_layer'][i])} |")
        print()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def cpu_description() -> str:
    """The CPU's model name and the vector ISA torch's kernels use here."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.is_file() else None
    name = found.group(1).strip() if found else "unknown CPU"
    return f"{name}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def model_sources(args) -> list[tuple[str, str]]:
    """(label, source) of every model to generate with: ``--compare`` entries, else ``--model``."""
    entries = args.compare or [args.model]
    return [tuple(e.split("=", 1)) if "=" in e else (e, e) for e in entries]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", default="all", choices=("ceiling", "generated", "all"),
                        help="ceiling: real clips and the codec/vocoder paths; generated: the model(s); all: both")
    parser.add_argument("--model", default="unimoe_audio_tiny", help="zoo name, name.tag or local-dir:PATH")
    parser.add_argument("--compare", nargs="+", metavar="[LABEL=]SOURCE", help="several models into one table")
    parser.add_argument("--codec", type=Path, help=f"MelTokenizer file (default {DEFAULT_CODEC.relative_to(REPO)} "
                        "if it exists)")
    parser.add_argument("--vocoder", type=Path, help=f"MelVocoder file (default {DEFAULT_VOCODER.relative_to(REPO)} "
                        "if it exists)")
    parser.add_argument("--codebooks", type=int, nargs="+", default=[4], help="codebooks decoded in the ceiling rows")
    parser.add_argument("--griffin-lim-iters", type=int, default=64)
    parser.add_argument("--judge-epochs", type=int, default=8)
    parser.add_argument("--judge-seed", type=int, default=0)
    parser.add_argument("--retrain-judge", action="store_true", help="train the judge even if it is cached")
    parser.add_argument("--data-seed", type=int, default=0, help="speech_items seed (the generator's data seed)")
    parser.add_argument("--ceiling-speech", type=int, default=400, help="real speech clips of the ceiling rows")
    parser.add_argument("--music-seed", type=int, default=1, help="MusicDataset seed of the real music clips")
    parser.add_argument("--music-renditions", type=int, default=2, help="renditions of each sound x timbre")
    parser.add_argument("--word-seeds", type=int, default=5, help="generations of each word")
    parser.add_argument("--music-seeds", type=int, default=1, help="generations of each note/chord caption")
    parser.add_argument("--frames", type=int, default=None, help="frames to generate (default: the model's max)")
    parser.add_argument("--guidance", type=float, default=AudioPipeline.DEFAULT_GUIDANCE)
    parser.add_argument("--temperature", type=float, default=AudioPipeline.DEFAULT_TEMPERATURE)
    parser.add_argument("--top-k", type=int, default=AudioPipeline.DEFAULT_TOP_K, help="0: sample among all codes")
    parser.add_argument("--batch", type=int, default=1, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where the judge is cached")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    positive = ("griffin_lim_iters", "judge_epochs", "ceiling_speech", "music_renditions", "word_seeds",
                "music_seeds", "batch")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(q < 1 for q in args.codebooks):
        parser.error(f"--codebooks must be >= 1 each, got {args.codebooks}")
    if args.frames is not None and args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.top_k < 0 or args.temperature < 0 or not math.isfinite(args.temperature):
        parser.error(f"--top-k must be >= 0 (0: all codes) and --temperature a finite number >= 0, got "
                     f"{args.top_k} and {args.temperature}")
    try:
        checked_guidance_scale(args.guidance)
    except ValueError as error:
        parser.error(f"--guidance: {error}")
    args.top_k = args.top_k or None
    if args.compare:
        labels = [label for label, _ in model_sources(args)]
        if any(not label or not source for label, source in model_sources(args)):
            parser.error(f"--compare takes SOURCE or LABEL=SOURCE entries, got {args.compare}")
        if len(set(labels)) != len(labels):
            parser.error(f"--compare labels must differ, got {labels}")
    for name in ("codec", "vocoder"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name} {path}: no such file")
    args.codec = args.codec or (DEFAULT_CODEC if DEFAULT_CODEC.is_file() else None)
    args.vocoder = args.vocoder or (DEFAULT_VOCODER if DEFAULT_VOCODER.is_file() else None)
    return args


def load_pipelines(args) -> dict:
    pipes = {}
    for label, source in model_sources(args):
        pipe = AudioPipeline.from_pretrained(source)
        pipe.set_progress_bar_config(disable=True)
        pipes[label] = pipe
    return pipes


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = MelTokenizer.from_pretrained(args.codec) if args.codec and args.task != "generated" else None
    if tokenizer is not None and max(args.codebooks) > tokenizer.num_codebooks:
        raise SystemExit(f"--codebooks {args.codebooks}: {args.codec} has {tokenizer.num_codebooks} codebooks")
    vocoder = MelVocoder.from_pretrained(args.vocoder) if args.vocoder and args.task != "generated" else None
    pipes = load_pipelines(args) if args.task != "ceiling" else {}  # a missing model fails before any work
    report = {"cpu": cpu_description(), "torch_threads": torch.get_num_threads(), "task": args.task,
              "codec": str(args.codec) if tokenizer else None, "vocoder": str(args.vocoder) if vocoder else None}
    print(f"{report['cpu']}; {report['torch_threads']} torch thread\n")

    judge, report["judge"] = fit_judge(args)
    info = report["judge"]
    worst = min(info["held_out_per_word"].items(), key=lambda item: item[1])
    print(f"word judge: {info['how']}; trained on {info['train_clips']} real clips of the judge split; on "
          f"{info['held_out_clips']} held-out real clips of the generator split: {info['held_out_accuracy']:.1%} "
          f"(lowest word: {worst[0]} {worst[1]:.1%})\n")

    clips = reference_clips(args)
    paths = file_ceiling_paths(args, tokenizer, vocoder) if args.task != "generated" else [("real clips", through())]
    paths += [model_ceiling_path(label, pipe.model) for label, pipe in pipes.items()]
    report["ceilings"] = [{"path": name, **read_clips(judge, transformed(clips, path))}
                          for name, path in tqdm(paths, desc="ceilings", leave=False)]
    skipped = [f"{what} (no file at {default.relative_to(REPO)}; pass --{what})"
               for what, default, loaded in (("codec", DEFAULT_CODEC, tokenizer), ("vocoder", DEFAULT_VOCODER, vocoder))
               if args.task != "generated" and loaded is None]
    print_ceilings(report["ceilings"], clips)
    if skipped:
        print("skipped rows: " + "; ".join(skipped) + "\n")

    if pipes:
        prompts = generation_prompts(args.word_seeds, args.music_seeds)
        report["generated"] = [bench_model(label, pipe, judge, prompts, args) for label, pipe in pipes.items()]
        print_models(report["generated"], args)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
