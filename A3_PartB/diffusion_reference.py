"""The expected values of the diffusion contract (diffusion_contract.py): the handout's math
with its typos corrected, in float64. Only the grader's processes hold it, never a box."""
import math

import torch


class Handout:
    """The handout's math with its typos corrected (listed below), in float64.

    Written for these tests alone, as the expected values: eq. (3) for alpha_t, eq. (6)'s abar_t
    as the running product of the clipped alphas, eq. (7)'s posterior with sqrt(alpha_t) on x_t,
    and abar_t (not alpha_t) in line 5 of Algorithms 1 and 2.
    """

    def __init__(self, timesteps, s=0.008):
        def f(t):
            return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

        # eq. (3): abar(t) / abar(t-1) = f(t) / f(t-1), as abar(t) = f(t) / f(0)
        ratios = [f(t) / f(t - 1) for t in range(1, timesteps + 1)]
        self.timesteps = timesteps
        self.alpha = torch.tensor(ratios, dtype=torch.float64).clamp(0.001, 1.0)
        self.abar = torch.cumprod(self.alpha, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.sigma = ((1 - self.abar_prev) / (1 - self.abar) * (1 - self.alpha)).sqrt()

    def q_sample(self, x_0, t, noise):
        """eq. (2) with abar_t (eq. 6; Algorithm 1 line 5); ``t`` holds one step per sample."""
        abar = self.abar[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x_0 + (1 - abar).sqrt() * noise

    def posterior_mean(self, x_t, t, eps):
        """Algorithm 2 lines 5-7 at step ``t`` (an int): eq. (8), the clamp, eq. (7)'s mean."""
        alpha, abar, abar_prev = self.alpha[t], self.abar[t], self.abar_prev[t]
        x_0 = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
        return (abar_prev.sqrt() * (1 - alpha) * x_0 + alpha.sqrt() * (1 - abar_prev) * x_t) / (1 - abar)

    def reverse_process(self, x_T, predict, draw):
        """Algorithm 2 from ``x_T``: the states x_{T-1} .. x_0 met on the way, and x_0 in [0, 1]."""
        states, x = [], x_T.double()
        for t in reversed(range(self.timesteps)):
            states.append(x)
            eps = predict(x, torch.full((len(x),), t, dtype=torch.long)).double()
            x = self.posterior_mean(x, t, eps)
            if t > 0:
                x = x + self.sigma[t] * draw(tuple(x.shape)).double()
        return torch.stack(states), (x + 1) / 2
