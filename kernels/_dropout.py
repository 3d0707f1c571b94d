"""Attention dropout's keep mask, shared by every backend (so a backward recomputes its forward's
mask, and backends agree bit for bit): a counter-based hash of (seed, b * H + h, i, j), mod 2^32,

    row = fmix32((fmix32((seed + bh * ROW_BH) mod 2^32) + i * ROW_I) mod 2^32)
    u_ij = fmix32((row + j * COL_J) mod 2^32);   keep iff u_ij >= dropout_threshold(p)

fmix32 being MurmurHash3's finaliser (full avalanche: neighbouring j give independent bits); kept
weights are scaled by 1 / (1 - p). The torch form is fastnotes.reference.attention.dropout_keep."""
FMIX_1, FMIX_2 = 0x85EBCA6B, 0xC2B2AE35
ROW_BH, ROW_I, COL_J = 0x9E3779B1, 0x7FEB352D, 0x27D4EB2F
LOW32 = 0xFFFFFFFF


def dropout_threshold(p):
    """The uint32 threshold of dropout probability p in [0, 1): keep iff hash >= it."""
    return min(int(p * 2.0 ** 32), LOW32)
