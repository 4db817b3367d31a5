"""talkingmachines: real-time, audio-driven, streaming talking avatars."""

__version__ = "0.1.0"
