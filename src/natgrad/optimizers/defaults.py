"""Every default of natgrad's optimisers in one place, with why it differs where it must.

docs/optimizers.md has the same table for reading; the factories read these values.

=================  ======================  ======================  ======================
keyword            natural_gradient        hessian_free            kfac
=================  ======================  ======================  ======================
learning_rate      1.0 (cap on α)          1.0 (first trial α)     1.0 (cap on α)
damping            LM(1e-2, floor 1e-2);   LM(1.0, floor 0.5);     fixed 1e-3
                   solver="dense":         solver="dense":
                   fixed 1e-10             fixed 1e-10
momentum           0                       0                       0
preconditioner     martens_diagonal()      martens_diagonal()      kfac(curvature)
curvature          "fisher"                "ggn"                   "fisher_mc"
step_rule          "kl" (δ = 1e-3)         "line_search"           "kl" (δ = 1e-3)
solver / direction CG, 5 its, warm 0.95    CG, 50 its, Martens     M⁻¹ g (factored),
                                           stop, backtracking      statistics every 5
                                                                   steps, inverses every 50;
                                                                   factors at least 256
                                                                   wide: rank 32 + identity
curvature_batch    None (whole batch)      None (whole batch)      512 (statistics pass)
=================  ======================  ======================  ======================
"""

from __future__ import annotations

from natgrad.damping import fixed, levenberg_marquardt

__all__ = [
    "NATURAL_GRADIENT_DAMPING",
    "NATURAL_GRADIENT_MAXITER",
    "DENSE_DAMPING",
    "HESSIAN_FREE_DAMPING",
    "HESSIAN_FREE_MIN_DAMPING",
    "KFAC_DAMPING",
    "KFAC_STATISTICS_EVERY",
    "KFAC_INVERSE_EVERY",
    "KFAC_INPUT_FACTOR_RANK",
    "KFAC_REJECT_RISES",
    "KFAC_CURVATURE_BATCH",
    "KL_RADIUS",
    "WARM_START",
]

# Natural gradient: λ never drops below 1e-2. Where the batch is fitted, the Fisher
# (diag(p) − ppᵀ per example) vanishes along most directions, and with a smaller λ the step grows
# there until the output KL it really causes is many times the ½dᵀFd the trust region bounds.
# Measured on a 784-128-10 MLP, MNIST-5k, batch 128, 300 steps (haiku's initialisation): floors
# 1e-4 / 1e-3 / 3e-3 / 1e-2 end at 85.8 / 89.1 / 87.9 / 92.6 % test accuracy (Adam 1e-3: 90.3 %),
# the lower floors peaking early and then degrading.
NATURAL_GRADIENT_DAMPING = levenberg_marquardt(1e-2, min_damping=1e-2)

# Natural gradient's CG: 5 iterations preconditioned by Martens' diagonal (the optimiser's
# `preconditioner="martens"`) instead of 10 plain ones (the default until 2026-12-08). Measured
# on Fashion-MNIST (`python -m benchmarks.variants`, one core, medians over data orders, the
# variants interleaved in one process; seconds exclude compilation and evaluation), 10 plain →
# 5 preconditioned: 784-128-10 / b128 (20k images, 5 orders) 90 / 240 → 120 / 190 steps and
# 0.90 / 2.22 → 0.71 / 1.15 s to 84 / 85 %, step 8.8 → 6.1 ms; autoencoder (δ = 0.1, 20k,
# 3 orders) 90 / 120 / 240 → 70 / 90 / 150 steps and 4.9 / 6.5 / 13.0 → 2.6 / 3.4 / 5.6 s to
# loss 260 / 240 / 230; CNN (20k, 2 orders) 21.5 / 27 → 24 / 34 steps, 20.7 / 25.9 → 14.7 /
# 20.8 s to 75 / 80 %; 784-512-512-10 / b1024 (60k, 2 orders) 43 → 60 steps and 22.4 → 21.1 s
# to 85 %. Five plain iterations lose the autoencoder's target (docs/benchmarks.md), ten
# preconditioned cost more per step than they save. The first-step compile grows from 93 to 108
# kernels (2.3 → 2.7× Adam's; target ≤ 3). Not a more exact solve: on a 784-128-10 batch
# (λ = 1e-2, CG from zero) 5 preconditioned iterations reach cos 0.92 with the exact solution, 5
# plain ones 0.96, 10 plain 0.97; the gain is the cheaper step and the direction's scaling.
NATURAL_GRADIENT_MAXITER = 5

# An exact (dense) solve is for small models fitted to high accuracy — physics-informed networks
# (Müller & Zeinhofer 2023): λ = 1e-10 fixed. On the 2D Poisson PINN (tanh 2-32-32-1, float64,
# Armijo line search) it reaches a relative L² error of 1e-7 (docs/pinn.md); 1e-8 stalls at
# 2.5e-6, 1e-12 breaks the Cholesky factorisation of the numerically singular JJᵀ + λI, and
# Levenberg-Marquardt from 1e-6 down to 1e-10 (ρ is noisy once the loss is ~1e-9) reached only
# 8.9e-6 in 300 steps where 1e-10 fixed is below 1e-5 after ~100.
DENSE_DAMPING = fixed(1e-10)

# Hessian-free has no KL bound on its step: LM, seeing ρ > ¾ on batches the model already fits,
# shrinks λ until the steps overshoot on the next batches. Measured on MNIST-5k, 784-128-10,
# batch 128 (`natgrad compare`), test accuracy after 2 / 6 epochs: no floor 80.9 / —, floor 0.1:
# 83.4 / 95.2, 0.3: 89.8 / 95.4, 0.5: 91.5 / 95.1, 1.0: 92.0 / 94.1. Martens (2010) used large
# batches, where a lower λ pays off: pass your own rule there.
HESSIAN_FREE_MIN_DAMPING = 0.5
HESSIAN_FREE_DAMPING = levenberg_marquardt(1.0, min_damping=HESSIAN_FREE_MIN_DAMPING)

# K-FAC: its KL trust region uses the (damped) Kronecker approximation itself, so a small fixed
# λ suffices and spares the extra forward pass that LM's ρ costs every step.
KFAC_DAMPING = 1e-3

# K-FAC amortises its curvature (kfac-jax's update periods): statistics every 5 steps, inverses
# every 50. Measured on Fashion-MNIST (first 20k images, 784-128-10, batch 128, one data order),
# steps to 84 / 85 / 87 % test accuracy: every step / inverses every 5 (the old default):
# 100 / 125 / 300; statistics 5, inverses 20: 100 / 125 / 275; 5 and 50: 100 / 125 / 250;
# 5 and 100: 100 / 125 / 325; 10 and 100: 100 / 125 / 325. A 785×785 inverse costs ~33 SGD
# steps on a CPU and the statistics pass ~2.7, so 5 / 50 cuts K-FAC's step from ~9-11 SGD
# steps to ~4 at no cost in steps.
KFAC_STATISTICS_EVERY = 5
KFAC_INVERSE_EVERY = 50

# K-FAC ("auto") inverts each input factor at least 256 wide as rank 32 plus a scaled identity
# (`low_rank.AUTO_MIN_WIDTH`; 512 until 2026-12-07: the measurements below are from then)
# (`natgrad.low_rank`; every factor exactly with input_factor_rank=None): applying the exact
# inverse of a 785-pixel factor, 785² per column, was the largest phase of the step (2.1-2.8
# SGD steps of 784-128-10 / batch 128), and its refresh (a 785 × 785 LU) ~40. Narrower factors
# stay exact: below 256 the saving is small (the exact application costs < 4× the low-rank
# one). Measured on the lineup's four
# Fashion-MNIST workloads (full protocol, 3 seeds, each its best of 3 KL radii, "auto" and
# exact side by side): the same steps to the top target, and seconds to it: mlp 1.36 → 0.81
# (87 %, 300 steps), deep-mlp 5.17 → 4.47 (88 %, 75), autoencoder 4.39 → 3.64 (loss 230, 240),
# cnn 11.89 → 10.52 (85 %, 60).
# Such a factor is kept as its sketch [A Ω | diag A] (Ω a fixed 785 × 64 Gaussian matrix) and
# inverted by Nyström (`natgrad.low_rank`): Σ ā āᵀ of a 785-wide input cost 2.4 gradients a
# statistics pass, its sketch 0.2. Measured (Fashion-MNIST, medians; exact factor with subspace
# iteration → sketch, side by side on the two cores): 784-128-10 / b128 (20k images, 5 data
# orders) steps to 84 / 85 / 87 % 80 / 110 / 300 → 80 / 120 / 300, its step in a lax.scan
# 3.0 → 2.3 SGD steps; deep MLP (3 orders) 45 / 60 / 85 → 40 / 55 / 85 to 85 / 87 / 88 %;
# autoencoder (3) 80 / 150 / 250 → 80 / 140 / 220 to loss 260 / 240 / 230; CNN (3) 50 / 55 / 80
# → 50 / 55 / 85 to 80 / 83 / 85 %.
# From 256 (was 512): the autoencoder (257-wide inputs, 256-wide outputs) reaches loss 230 in
# 190 steps / 1.45 s instead of 240 / 2.23 s (Fashion-MNIST, 3 data orders, side by side), the
# character-level transformer (a 256-wide MLP layer) ends at 1.877 nats/char instead of 1.888
# after 400 steps at a 2 % cheaper step; the other benchmark models have no factor 256-511 wide.
KFAC_INPUT_FACTOR_RANK = "auto"

# The same for output factors G at least 256 wide (kept as [G Ω | diag G]; 512 until the same
# change, below the measurements with 512): a 512-unit hidden
# layer's G⁻¹ applied to V (785 × 512) was the largest phase of 784-512-512-10 at batch 128.
# Measured (Fashion-MNIST 60k, 3 data orders, each order "auto" and exact G side by side, one
# core): the same steps to every target and fewer seconds — 784-512-512-10 / b128 0.87 / 4.32 s
# → from 1.20 / 6.22 s to 85 / 88 % (step 15.2 → 11.4 ms), / b1024 2.51 / 4.97 → 2.22 / 4.67 s,
# autoencoder (its 784-pixel output's G) 15.41 → 10.89 s to loss 230 (step 12.1 → 8.8 ms).
KFAC_OUTPUT_FACTOR_RANK = "auto"

# The trial loss f(θ + p) that rejects a rising step: natural_gradient and hessian_free compute it
# anyway (ρ, line search), K-FAC would pay a forward pass for it — measured 2 % of its step on
# 784-128-10 / batch 128 and 15 % on 784-512-512-10 / batch 1024 — so K-FAC's is off by default.
KFAC_REJECT_RISES = False

# K-FAC's statistics pass sees at most 512 examples of a batch (every ⌈B/512⌉-th; smaller
# batches whole). Its factors are moving averages over ~20 passes (β = 0.95), so a pass of 512
# examples estimates them as well as one of 1024 at half the cost. Measured on Fashion-MNIST
# (60k), 784-512-512-10, batch 1024, 5 data orders, statistics on all 1024 / on 512: median steps
# to 85 / 87 / 88 % test accuracy 40 / 60 / 85 both; seconds 2.35 / 3.77 / 4.99 → 2.20 / 3.11 /
# 4.42; on 784-128-10 at batch 128, 32 or 64 examples took 13-23 % more steps to 87 %, which is
# why the floor is not lower. Natural gradient and Hessian-free keep the whole batch: their
# curvature is this batch's alone (no average), and 32 of 128 examples cost natural gradient
# 12× the steps.
KFAC_CURVATURE_BATCH = 512

KL_RADIUS = 1e-3  # δ of the KL trust region (natural_gradient, kfac)
WARM_START = 0.95  # ζ, CG warm-start decay (Martens 2010, §4.5)
