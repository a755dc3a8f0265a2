"""Procedural audio: tones and chords with a pitch, a chord quality, a timbre and a rhythm.

Deterministic from (seed, index); every categorical label is named in the caption, e.g.
"a square-wave C minor chord, pulsing 4 times a second".
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from worldmodel.data.procedural_images import checked_index

PITCHES = ("A", "A#", "B", "C", "C#", "D", "D#", "E", "F", "F#", "G", "G#")  # semitones above A3 (220 Hz)
CHORDS = {"single": (0,), "major": (0, 4, 7), "minor": (0, 3, 7), "fifth": (0, 7, 12)}  # semitone offsets
CHORD_NAMES = tuple(CHORDS)
TIMBRES = ("sine", "square", "sawtooth", "triangle")
RHYTHMS = (0, 2, 4, 8)  # notes per second; 0 = one sustained note
RHYTHM_WORDS = ("sustained", "pulsing twice a second", "pulsing 4 times a second", "pulsing 8 times a second")
BASE_HZ = 220.0


def waveform(timbre: int, phase: np.ndarray) -> np.ndarray:
    """One period-1 waveform in [-1, 1] evaluated at ``phase`` (cycles)."""
    frac = phase % 1.0
    name = TIMBRES[timbre]
    if name == "sine":
        return np.sin(2 * np.pi * frac)
    if name == "square":
        return np.where(frac < 0.5, 1.0, -1.0) * 0.6  # quieter: a square wave is loud for its amplitude
    if name == "sawtooth":
        return (2.0 * frac - 1.0) * 0.8
    if name == "triangle":
        return 1.0 - 4.0 * np.abs(frac - 0.5)
    raise ValueError(f"unknown timbre index {timbre}; valid 0..{len(TIMBRES) - 1}")


def envelope(n: int, sample_rate: int, rate: int) -> np.ndarray:
    """(n,) amplitude envelope: fade in/out for a sustained note, else ``rate`` plucked notes per second."""
    t = np.arange(n, dtype=np.float64) / sample_rate
    if rate == 0:
        fade = min(0.02, n / sample_rate / 4)
        return np.clip(np.minimum(t, t[-1] - t) / fade, 0.0, 1.0)
    local = t % (1.0 / rate)  # time since the current note started
    attack = 0.005
    return np.where(local < attack, local / attack, np.exp(-(local - attack) * rate * 4.0))


class ProceduralAudio(Dataset):
    """Map-style dataset of (S,) mono clips in [-1, 1] with captions and labels.

    Sample: ``{"audio": (S,) float32, "sample_rate": int, "caption": str,
    "labels": {"pitch", "chord", "timbre", "rhythm": int; "frequency", "loudness": float}}``.
    """

    label_names = ("pitch", "chord", "timbre", "rhythm", "frequency", "loudness")
    num_classes = {"pitch": len(PITCHES), "chord": len(CHORDS), "timbre": len(TIMBRES), "rhythm": len(RHYTHMS)}
    class_names = {"pitch": PITCHES, "chord": CHORD_NAMES, "timbre": TIMBRES, "rhythm": RHYTHM_WORDS}

    def __init__(self, sample_rate: int = 8000, seconds: float = 1.0, length: int = 100_000, seed: int = 0):
        self.num_samples = int(round(sample_rate * seconds))
        if sample_rate < 1000 or self.num_samples < 16:
            raise ValueError(f"ProceduralAudio needs sample_rate >= 1000 and a clip of >= 16 samples, "
                             f"got sample_rate={sample_rate}, seconds={seconds}")
        if length <= 0:
            raise ValueError(f"ProceduralAudio length must be positive, got {length}")
        self.sample_rate, self.seconds = int(sample_rate), float(seconds)
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = checked_index(index, self.length, "ProceduralAudio")
        rng = np.random.default_rng([self.seed, 0xA0D10, index])
        pitch, chord = int(rng.integers(len(PITCHES))), int(rng.integers(len(CHORDS)))
        timbre, rhythm = int(rng.integers(len(TIMBRES))), int(rng.integers(len(RHYTHMS)))
        loudness = float(rng.uniform(0.4, 0.9))
        frequency = BASE_HZ * 2.0 ** (pitch / 12.0)
        t = np.arange(self.num_samples, dtype=np.float64) / self.sample_rate
        offsets = CHORDS[CHORD_NAMES[chord]]
        mix = np.zeros(self.num_samples)
        for semis in offsets:
            mix += waveform(timbre, frequency * 2.0 ** (semis / 12.0) * t + rng.uniform())
        mix /= len(offsets)
        audio = np.clip(mix * envelope(self.num_samples, self.sample_rate, RHYTHMS[rhythm]) * loudness, -1.0, 1.0)
        labels = {"pitch": pitch, "chord": chord, "timbre": timbre, "rhythm": rhythm, "frequency": frequency,
                  "loudness": loudness}
        return {"audio": torch.from_numpy(audio.astype(np.float32)), "sample_rate": self.sample_rate,
                "caption": audio_caption(labels), "labels": labels}


def audio_caption(labels: dict) -> str:
    """'a square-wave C minor chord, pulsing 4 times a second' from the labels."""
    timbre = TIMBRES[labels["timbre"]]
    sound = f"{timbre}-wave" if timbre != "sine" else "sine"
    note = PITCHES[labels["pitch"]]
    chord = CHORD_NAMES[labels["chord"]]
    what = {"single": f"{note} tone", "fifth": f"{note} power chord"}.get(chord, f"{note} {chord} chord")
    return f"a {sound} {what}, {RHYTHM_WORDS[labels['rhythm']]}"
