"""Latent consistency distillation (PixArt-δ §2, arXiv 2401.05252, after LCM, arXiv 2310.04378): a student learns
to jump from any point of its guided teacher's sampling path straight to the path's end, so that 4 steps of
sample(..., sampler="lcm", cfg_scale=1) draw what the teacher draws in 20 guided ones. The official recipe is
train_scripts/train_pixart_lcm.py with configs/pixart_config/PixArt_xl2_img1024_lcm.py; `train.py --distill-lcm
TEACHER` runs it, with lcm_loss in place of the training loss (on the toy with a teacher step of 100 rather than
20, and the squared difference, the script's other loss, in place of the pseudo-Huber: docs/lcm.md says why). In
symbols, the official values:

  x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   t = 20 (n + 1) - 1, n ~ U{0..49},   s = max(t - 20, 0)
  f      = c_skip(t) x_t + c_out(t) x0_student(x_t, t)                  the consistency function: f(x, 0) = x
  x_s    = sqrt(abar_s) x0_teacher + sqrt(1 - abar_s) eps_teacher       one guided DDIM step of the teacher
  target = c_skip(s) x_s + c_out(s) x0_ema(x_s, s)                      the EMA student, one step further on
  loss   = mean(sqrt((f - target)^2 + c^2) - c),   c = 0.001            pseudo-Huber, no gradient through target
"""
import torch

import pixart_min as pm

GRID = 50                  # the teacher's DDIM grid: t_n = 19, 39, ..., 999 (the config's num_ddim_timesteps)
SKIP = pm.T // GRID        # 20: one step of that grid, from t_n to t_(n-1) (the script's topk)
HUBER_C = 0.001            # the config's huber_c (loss_type "huber")
TARGET_DECAY = 0.95        # the target network's EMA decay (the config's ema_decay)


def grid_timesteps(n, generator):
    """(n,) starting steps t_n = 20 (n + 1) - 1 of the 50-step grid, n uniform over 0..49 (the script's index)."""
    return SKIP * (torch.randint(0, GRID, (n,), generator=generator) + 1) - 1


def boundary_scalings(t):
    """c_skip(t), c_out(t) as (B, 1, 1, 1), LCMScheduler's (sigma_data 0.5, t scaled by 10): c_skip(0) = 1 and
    c_out(0) = 0, so f(x, 0) = x; from t = 1 on, f is almost the clean-picture estimate alone."""
    t = t.double().view(-1, 1, 1, 1) * 10
    c = t ** 2 + 0.25
    return (0.25 / c).float(), (t / c.sqrt()).float()


def estimates(out, x, t, prediction):
    """The noise and the clean picture that a network's output (its first C channels) says x at step t holds, as
    pm.sample reads them."""
    a = pm.ALPHAS_CUMPROD.to(x.device)[t].view(-1, 1, 1, 1)             # float64: 1 - abar keeps its digits
    eps = pm.eps_from(out[:, :x.shape[1]].float(), x, a.float(), prediction)
    return eps, (x - (1 - a).sqrt().float() * eps) / a.sqrt().float()


def consistency(model, x, t, y, mask, hw, ar, prediction):
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): where the path through x at step t ends."""
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * estimates(model(x, t, y, mask, hw, ar), x, t, prediction)[1]


def teacher_step(teacher, x, t, s, y, mask, hw, ar, cfg):
    """One DDIM step of the teacher from t down to s, guided at cfg (the ordinary scale, as sample's cfg_scale):
    uncond + cfg (cond - uncond) is the LCM paper's cond + w (cond - uncond) at w = cfg - 1."""
    B = len(x)
    two = lambda v: None if v is None else torch.cat([v, v])
    null = torch.arange(2 * B, device=x.device) < B                       # the first half gets the null caption
    out = teacher(two(x), two(t), two(y), two(mask), two(hw), two(ar), force_drop_ids=null).float()
    eps, x0 = estimates(out[:B] + cfg * (out[B:] - out[:B]), x, t, teacher.config.prediction)
    a_s = pm.ALPHAS_CUMPROD.to(x.device)[s].view(-1, 1, 1, 1)           # s = 0: abar_0, as the script's solver
    return a_s.sqrt().float() * x0 + (1 - a_s).sqrt().float() * eps


def lcm_loss(student, teacher, target, x0, y, mask=None, hw=None, ar=None, t=None, noise=None, prediction=None,
             cfg=4.5, huber_c=HUBER_C, skip=SKIP):
    """The latent consistency distillation loss, a mean over the batch. student: the network being trained (a
    function, as training_loss takes); teacher: frozen; target: the student's EMA (the script's model_ema), no
    gradient. t: starting steps from grid_timesteps; x0 (B, C, H, W) clean latents; y, mask captions; huber_c:
    the pseudo-Huber loss's c, below which a difference counts as its square, above it as its size (the config's
    loss_type "huber"), or None: the squared difference (its loss_type "l2"); skip: the teacher's step, t - s
    (the LCM paper's skipping step k; the script's 20, one step of its grid)."""
    prediction = prediction or teacher.config.prediction
    t = grid_timesteps(len(x0), None).to(x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    s = (t - skip).clamp(min=0)
    xt = pm.q_sample(x0, t, noise)
    f = consistency(student, xt, t, y, mask, hw, ar, prediction)
    with torch.no_grad():
        xs = teacher_step(teacher, xt, t, s, y, mask, hw, ar, cfg)
        goal = consistency(target, xs, s, y, mask, hw, ar, prediction)
    if huber_c is None:
        return ((f - goal) ** 2).mean()
    return (((f - goal) ** 2 + huber_c ** 2).sqrt() - huber_c).mean()
