"""Procedural talking-face data set for the `tiny` preset.

There is no real talking-head data in this project, so the tiny model is trained on clips
that are drawn here: faces of varied shape, colour and drawing style (flat cartoon,
outlined cartoon, shaded, photo-like) whose mouths open and change shape with speech,
that blink, move their heads a little, and close their mouths while listening.

Modules, bottom up (everything public is re-exported here):

* `face`: `FaceParams.sample(seed)`, one identity (shape, colours, hair, style, ...);
  `FaceState`, what changes per frame (mouth_open, mouth_round, blink, head dx/dy/tilt, brow,
  gaze); `framed(params, version)`, the identity as each data version frames it.
* `render`: `FaceRenderer(params, size)` draws the static layers once (background, body,
  head with hair and shading) and composes a frame per state; `render_face(params, state,
  size)` is a cached shortcut; `mouth_roi_from_face` and `eyes_roi_from_face`, the mouth's and
  the eyes' pixel boxes, and `features_mask_from_face` both as a mask.
* `speech`: `espeak_tts` (espeak-ng, resampled to 16 kHz) or `babble_tts` (a pure numpy
  formant synthesiser, the fallback when espeak-ng is missing).
* `mouth`: `mouth_drive(audio)`, per video frame (640 samples) mouth opening from the
  smoothed RMS energy (`model.audio.frame_rms`) and mouth roundness from the spectral
  balance; both zero in silence.
* `clip`: `make_clip(seed, seconds, size)`: turns of speech and silence, blinks, idle and
  speaking head motion -> `Clip` (T = 1 + 4k frames, audio T * 640 samples).
* `writer`: `synth_dataset(n, out_dir)` writes `clip_XXXXX.mp4` (for people),
  `clip_XXXXX.npz` (for training) and `index.json`; resumable, atomic writes.
* `assets`: `preview(path)`, a contact sheet of random faces; `make_assets`, the bundled
  portrait and speech.

Run `talkingmachines data synth --help` for the command line.
"""

from ...audio_io import write_wav
from .assets import PORTRAIT_SEED, SPEECH_TEXT, default_portrait, make_assets, preview
from .clip import STEADY_GAZE, Clip, clip_frames_for, gaze_track, head_motion, make_clip, moves_head
from .face import (
    DATA_VERSIONS, HAIR_STYLES, NOSE_STYLES, STYLES, Color, FaceParams, FaceState, check_data_version, framed,
)
from .mouth import MOUTH_GATE_RMS, MOUTH_REF_RMS, mouth_drive
from .render import (
    FaceRenderer, clip_box, eyes_roi_from_face, features_mask_from_face, mouth_roi_from_face, render_face,
)
from .speech import ESPEAK_VOICES, babble_tts, espeak_available, espeak_tts, random_sentence, resample
from .writer import synth_dataset

__all__ = [
    "Clip", "Color", "DATA_VERSIONS", "ESPEAK_VOICES", "FaceParams", "FaceRenderer", "FaceState", "HAIR_STYLES",
    "MOUTH_GATE_RMS", "MOUTH_REF_RMS", "NOSE_STYLES", "PORTRAIT_SEED", "SPEECH_TEXT", "STEADY_GAZE", "STYLES", "babble_tts",
    "check_data_version", "clip_box", "clip_frames_for", "default_portrait", "espeak_available", "espeak_tts",
    "eyes_roi_from_face", "features_mask_from_face", "framed", "gaze_track", "head_motion", "make_assets", "make_clip", "moves_head",
    "mouth_drive", "mouth_roi_from_face", "preview", "random_sentence", "render_face", "resample", "synth_dataset",
    "write_wav",
]
