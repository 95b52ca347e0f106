"""Fits the polynomial R(t) of the CPU gelu kernels (csrc/include/torchfast/activations.h, GeluErf):

    erfc(z) = t * exp(-z^2) * R(t),   t = 1 / (1 + z/2),   z >= 0,   so R(t) = erfcx(z) / t,

for relative error, on Chebyshev nodes of t in (0, 1], by weighted least squares with Lawson's
iterations toward the minimax fit. Prints, per degree, the fit's max relative error, the error of the
coefficients rounded to float and evaluated by float Horner (what the kernel does), and the
coefficients, highest power first.

    python scripts/fit_gelu_erfc.py            # degrees 6 and 9, the ones the kernels use
"""

import sys

import numpy as np
import torch


def target(t):
    z = 2 * (1 / t - 1)
    return torch.special.erfcx(torch.tensor(z, dtype=torch.float64)).numpy() / t


def fit(deg, nodes=6000, iterations=60):
    t = 0.5 - 0.5 * np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes)
    y = target(t)
    w, lawson = 1 / np.abs(y), np.ones_like(t)
    for _ in range(iterations):
        basis = np.polynomial.chebyshev.chebvander(2 * t - 1, deg)
        sw = w * np.sqrt(lawson)
        c, *_ = np.linalg.lstsq(basis * sw[:, None], y * sw, rcond=None)
        lawson *= np.abs(np.polynomial.chebyshev.chebval(2 * t - 1, c) - y) * w
        lawson /= lawson.sum()
    return np.polynomial.Polynomial(np.polynomial.chebyshev.cheb2poly(c))(np.polynomial.Polynomial([-1, 2]))


def main(degrees):
    tt = np.linspace(1e-7, 1, 400001)
    yy = target(tt)
    for deg in degrees:
        p = fit(deg)
        coef = p.coef.astype(np.float32)
        t32, acc = tt.astype(np.float32), np.full(tt.shape, coef[-1], dtype=np.float32)
        for k in coef[-2::-1]:
            acc = acc * t32 + k
        fit_err = np.max(np.abs(p(tt) - yy) / yy)
        float_err = np.max(np.abs(acc.astype(np.float64) - yy) / yy)
        print(f"degree {deg}: fit {fit_err:.2e}, float Horner {float_err:.2e}")
        print("  {" + ", ".join(f"{v:.9g}" for v in p.coef[::-1]) + "}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [6, 9])
