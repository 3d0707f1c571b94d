"""Torch wrappers over the CUDA C++ kernels of fastnotes._C (built from csrc/ when nvcc is found), one
module per op family. Each op is a torch.library.custom_op with a register_fake, so it works under
torch.compile and with fake tensors; the modules import without the extension and raise a clear
error only when an op runs."""
