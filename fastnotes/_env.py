"""What this machine is: library versions and the device name (for reports and benchmarks)."""
import platform


def versions():
    import numpy
    import torch

    import fastnotes

    found = {"fastnotes": fastnotes.__version__, "python": platform.python_version(),
             "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("numba", "triton"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device):
    """Device name and thread counts, for benchmark records."""
    import torch

    if device == "cuda":
        return {"device_name": torch.cuda.get_device_name(), "threads": None}
    try:
        import numba

        numba_threads = numba.get_num_threads()
    except ImportError:
        numba_threads = None
    return {"device_name": cpu_name(), "threads": {"torch": torch.get_num_threads(), "numba": numba_threads}}
