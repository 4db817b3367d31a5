"""Stand-in for PyAV on the GPU box, used by scripts/gpu_capacity/run.sh only when `import av`
fails there (PyAV's 36 MB wheel does not fit a device call): just the audio resampling that the
synthetic speech uses, done in the frequency domain with numpy (band-limited, like
libswresample; correlation 0.99 with PyAV's output on noise, tests/test_gpu_kit.py)."""
import numpy as np


class AudioFrame:
    def __init__(self, data, sample_rate=16000):
        self.data, self.sample_rate = data, sample_rate

    @classmethod
    def from_ndarray(cls, arr, format="flt", layout="mono"):
        return cls(np.asarray(arr, np.float32))

    def to_ndarray(self):
        return self.data


class AudioResampler:
    def __init__(self, format="flt", layout="mono", rate=16000):
        self.rate = rate

    def resample(self, frame):
        if frame is None:
            return []
        x = frame.data[0].astype(np.float64)
        n = int(round(len(x) * self.rate / frame.sample_rate))
        spec = np.fft.rfft(x)
        keep = min(len(spec), n // 2 + 1)  # drop what lies above the new Nyquist frequency
        y = np.fft.irfft(spec[:keep], n) * (n / len(x))
        return [AudioFrame(y.astype(np.float32)[None, :], self.rate)]
