"""PLAN: Progressive Local Alignment Network (arXiv 2502.18047; methods.md section 7).

What the abstract fixes [P]: local alignment is learned by a contrastive objective over word-pixel
relationships producing soft regions per word; a progressive strategy iteratively refines these
relationships; the combination suppresses noise. **The concrete form below is reconstructed [I]**
(methods.md section 7.2); every reconstructed choice is a config field.

Soft map of report a's words over image b's patches and region vectors:

    A^(a->b)_tk = softmax_k(<w_at, p_bk> / tau_w),   rho^(a->b)_t = normalise(sum_k A_tk p_bk)

Cross-sample local score and loss (GLoRIA-like, one softmax):

    R(a, b) = 1/tau_agg log sum_{t in T_a} omega_at exp(tau_agg <w_at, rho^(a->b)_t>)
    L_loc   = bidirectional CE over the batch of R / tau_r

omega: MGCA word weights (default; renormalised over the kept words) or uniform 1/|T_a|.
Noise suppression (stage >= ns_from_stage): A_tk <- A_tk 1[A_tk >= rho_ns max_k A_tk], renormalised; words
whose positive-pair map (a -> a) has entropy > eta log P leave T_a (a report keeps all its words if none
would survive). Stage-3 refinement with the EMA teacher's maps Abar (stop-grad):
A <- normalise(A * Abar^gamma) before the suppression, and L_cons = KL(Abar || A) on positive pairs with
the student's raw map, averaged over valid words.

Two optional refinements of every soft map the local term uses (the positive-pair maps that decide T_a
included; ``L_cons`` keeps the raw maps), both [I], from secondary summaries that describe "word and pixel
importance weights taken from the word-pixel similarity matrix" and "a similarity matrix refined every
iteration from its history". Both are priors over the patches, multiplied into A and renormalised
(``log A <- log_softmax(log A + log prior)``, with the teacher prior when both are on):

  pixel importance (``pixel_importance`` = beta, 0 = off): for report a and image b,
      pi^(a->b)_k = softmax_k( sum_t omega0_at <w_at, p_bk> / tau_w )      (stop-grad)
      with omega0 the word weights over all valid words (before the entropy rule); prior pi^beta:
      patches that the report as a whole matches gain weight in every word's region.
  running map prior (``running_prior_gamma`` = gamma_r, 0 = off): a distribution m over the p patch
      positions, carried in the method params (``map_prior`` [p], uniform at init; no gradient, no
      optimiser update: ``trainable`` is False) and refined after every finite training step from the
      step's maps: m <- mu m + (1 - mu) m_hat, mu = ``running_prior_momentum``, m_hat = the mean over the
      valid words of the valid pairs of the raw positive-pair maps softmax_k(<w_bt, p_bk> / tau_w(stage))
      (stop-grad; every stage, so m is warm when stage 2 starts; a step without valid words keeps m).
      A global mean, so it is the same under any sharding and independent of the batch size; with
      gradient accumulation the micro-batches' m_hat are averaged. The loss uses the m of the steps
      before (the history), prior m^gamma_r: gamma_r > 0 favours the positions the maps have attended
      so far (background that no word ever attends is suppressed), gamma_r < 0 discounts them (positions
      that attract every word, e.g. artefact patches). ``similarity_maps`` applies both refinements.
      The update is ``Objective.update_state``: the loss reports m_hat as the non-scalar metric
      ``plan/map_batch``, which the train step consumes.

Progressive schedule, a function of the traced step (``lax.switch`` on the stage, so stage 1 does not
compute the local term at all):

    stage 1 [0, stage2_start):  L_ITC
    stage 2 [stage2_start, stage3_start):  L_ITC + lambda_loc(s) L_loc, tau_w = tau_w_stage2
    stage 3 [stage3_start, ...):  L_ITC + lambda_loc(s) L_loc + lambda_cons L_cons, tau_w = tau_w_stage3
    lambda_loc(s) = lambda_loc * clip((s - stage2_start) / loc_ramp_steps, 0, 1)

Stage 3 needs ``teacher_out`` (the EMA encoders' outputs): ``Objective.ema_decay`` is set from
``ema_decay`` (0.999); a missing teacher raises at trace time.

Config (``config.method``), reconstructed choices marked [I]:
  itc_temperature [I] 0.07; itc_reduce_directions [I] "sum" (MGCA's ITA) | "mean".
  tau_w_stage2, tau_w_stage3 [I] 0.1, 0.05; tau_agg [I] 5.0; tau_r [I] 0.1;
  loc_reduce_directions [I] "sum" | "mean".
  word_weights [I] "mgca" | "uniform"; word_weight_quantiles (0.1, 0.9).
  stage2_start_epoch [I] 10 (None: ITC only); stage3_start_epoch [I] 30 (None: no stage 3);
  loc_ramp_epochs [I] 2.0; lambda_loc [I] 1.0; lambda_cons [I] 0.1.
  ns_from_stage [I] 2 (4 or more: never); ns_rel_threshold [I] rho_ns = 0.3; ns_entropy [I] eta = 0.9.
  prior_gamma [I] gamma = 0.5; ema_decay [I] 0.999.
  pixel_importance [I] beta = 0.0 (off; e.g. 1.0); running_prior_gamma [I] gamma_r = 0.0 (off; e.g. 0.5);
  running_prior_momentum [I] mu = 0.99. Both off by default: nothing in the abstract asks for them.
  text_chunk: reports per chunk of the cross-sample term (8; None: whole batch at once).

Cost (b batch, t text slots, p patches, d width): the local term is O(b^2 t p d) FLOPs (maps, region
vectors and scores; doubled in stage 3 for the teacher maps) and, computed over report chunks of size
c = text_chunk under ``jax.checkpoint``, O(c b t (p + d)) activation memory instead of O(b^2 t (p + d));
the backward recomputes each chunk (about one extra forward of the local term). Positive-pair maps,
entropy and L_cons: O(b t p d) FLOPs, O(b t p) memory. ITC: O(b^2 d). Pixel importance: O(b^2 t p) more
(a weighted sum of the dot products already computed, inside the chunks); running prior: m_hat
O(b t p d) every step, the prior O(p).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from medvlp_jax.methods import OBJECTIVES, Objective, common, local_ops
from medvlp_jax.types import Array, Batch, EncoderOutputs, LossContext


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Resolved ``config.method`` of PLAN (see the module docstring for each field)."""
    itc_temperature: float = 0.07
    itc_reduce_directions: str = "sum"
    tau_w_stage2: float = 0.1
    tau_w_stage3: float = 0.05
    tau_agg: float = 5.0
    tau_r: float = 0.1
    loc_reduce_directions: str = "sum"
    word_weights: str = "mgca"
    word_weight_quantiles: tuple[float, float] = (0.1, 0.9)
    stage2_start_epoch: Optional[float] = 10.0
    stage3_start_epoch: Optional[float] = 30.0
    loc_ramp_epochs: float = 2.0
    lambda_loc: float = 1.0
    lambda_cons: float = 0.1
    ns_from_stage: int = 2
    ns_rel_threshold: float = 0.3
    ns_entropy: float = 0.9
    prior_gamma: float = 0.5
    ema_decay: Optional[float] = 0.999
    pixel_importance: float = 0.0
    running_prior_gamma: float = 0.0
    running_prior_momentum: float = 0.99
    text_chunk: Optional[int] = 8

    def __post_init__(self):
        for name in ("itc_reduce_directions", "loc_reduce_directions"):
            if getattr(self, name) not in ("sum", "mean"):
                raise ValueError(f"PLAN {name} must be 'sum' or 'mean', got {getattr(self, name)!r}")
        if self.word_weights not in ("mgca", "uniform"):
            raise ValueError(f"PLAN word_weights must be 'mgca' or 'uniform', got {self.word_weights!r}")
        if not 0.0 <= self.running_prior_momentum < 1.0:
            raise ValueError(f"PLAN running_prior_momentum must be in [0, 1), got {self.running_prior_momentum!r}")
        if self.stage3_start_epoch is not None:
            if self.stage2_start_epoch is None or self.stage3_start_epoch < self.stage2_start_epoch:
                raise ValueError("PLAN stage3_start_epoch needs stage2_start_epoch <= stage3_start_epoch")
            if self.ema_decay is None:
                raise ValueError("PLAN stage 3 uses the EMA teacher: set method.ema_decay (e.g. 0.999) or "
                                 "disable stage 3 with method.stage3_start_epoch = None")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Static settings of one local-alignment stage (2 or 3)."""
    tau_w: float
    noise_suppression: bool
    teacher_prior: bool


def log_maps(words: Array, patches: Array, tau_w: float, teacher: Optional[tuple[Array, Array]] = None,
             gamma: float = 0.5, pixel: Optional[tuple[Array, float]] = None,
             running: Optional[Array] = None) -> Array:
    """log A: word->patch soft maps, optionally refined by priors over the patches (module docstring).

    Args:
      words: [..., t, d]; patches: [..., p, d] (broadcastable leading dims).
      teacher: (teacher words [..., t, d], teacher patches [..., p, d]) or None; prior Abar^gamma.
      pixel: (omega0 [..., t] word weights, beta) or None; prior pi^beta (pixel importance).
      running: [p] log running prior already times gamma_r, or None.
    Returns:
      [..., t, p] log-probabilities over patches.
    """
    dots = jnp.einsum("...td,...pd->...tp", words, patches)
    logp = jax.nn.log_softmax(dots / tau_w, axis=-1)
    prior = None
    if teacher is not None:
        t_logp = jax.lax.stop_gradient(
            jax.nn.log_softmax(jnp.einsum("...td,...pd->...tp", *teacher) / tau_w, axis=-1))
        prior = gamma * t_logp
    if pixel is not None:
        omega0, beta = pixel
        term = beta * pixel_log_importance(dots, omega0, tau_w)
        prior = term if prior is None else prior + term
    if running is not None:
        prior = running if prior is None else prior + running
    if prior is not None:
        logp = jax.nn.log_softmax(logp + prior, axis=-1)                       # normalise(A * priors)
    return logp


def pixel_log_importance(dots: Array, omega0: Array, tau_w: float) -> Array:
    """log pi: [..., 1, p], log softmax_k(sum_t omega0_t dots_tk / tau_w) (stop-grad).

    Args:
      dots: [..., t, p] word-patch dot products; omega0: [..., t] word weights (broadcastable).
    """
    logits = jnp.sum(omega0[..., :, None] * dots, axis=-2) / tau_w
    return jax.lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))[..., None, :]


def batch_mean_map(words: Array, patches: Array, word_mask: Array, valid: Array, tau_w, prior: Array) -> Array:
    """m_hat: [p], the mean raw positive-pair map over the valid words of the valid pairs (stop-grad).

    Args:
      words: [b, t, d]; patches: [b, p, d]; word_mask: [b, t]; valid: [b]; tau_w: scalar (may be traced);
      prior: [p] the current running prior, returned when the batch has no valid word.
    """
    a = jax.nn.softmax(jnp.einsum("btd,bpd->btp", words, patches) / tau_w, axis=-1)
    sel = (word_mask & valid[:, None]).astype(a.dtype)
    n = jnp.sum(sel)
    mean = jnp.einsum("btp,bt->p", a, sel) / jnp.maximum(n, 1.0)
    return jax.lax.stop_gradient(jnp.where(n > 0, mean, prior))


def suppress_noise(a: Array, rel_threshold: float) -> Array:
    """Zero map entries below rel_threshold * row max and renormalise. a: [..., p]. Returns [..., p]."""
    keep = jax.lax.stop_gradient(a >= rel_threshold * jnp.max(a, axis=-1, keepdims=True))
    a = jnp.where(keep, a, 0.0)
    return a / jnp.sum(a, axis=-1, keepdims=True)   # the row max always survives, so the sum is > 0


def word_entropy(logp: Array) -> Array:
    """Entropy of each word's map. logp: [..., t, p]. Returns [..., t]."""
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def local_scores(words: Array, log_omega: Array, patches: Array, spec: StageSpec, cfg: PlanConfig,
                 teacher: Optional[tuple[Array, Array]] = None, omega0: Optional[Array] = None,
                 running: Optional[Array] = None) -> Array:
    """R(a, b) for every report a and image b, computed over report chunks.

    Args:
      words: [b, t, d]; log_omega: [b, t] log word weights (NEG_INF for words outside T_a);
      patches: [b, p, d]; teacher: (teacher words [b, t, d], teacher patches [b, p, d]) or None.
      omega0: [b, t] word weights of the pixel importance (None: off); running: [p] scaled log running
        prior (None: off).
    Returns:
      [b (reports), b (images)].
    """
    def body(chunk):
        w, lw = chunk[0], chunk[1]
        prior = None if teacher is None else (chunk[2][:, None], teacher[1][None])
        pixel = None if omega0 is None else (chunk[-1][:, None, :], cfg.pixel_importance)
        logp = log_maps(w[:, None], patches[None], spec.tau_w, prior, cfg.prior_gamma, pixel,
                        running)                                                      # [c, b, t, p]
        a = jnp.exp(logp)
        if spec.noise_suppression:
            a = suppress_noise(a, cfg.ns_rel_threshold)
        rho = common.l2_normalize(jnp.einsum("cbtp,bpd->cbtd", a, patches))
        cos = jnp.einsum("ctd,cbtd->cbt", w, rho)
        return jax.nn.logsumexp(cfg.tau_agg * cos + lw[:, None, :], axis=-1) / cfg.tau_agg   # [c, b]

    reports = (words, log_omega) + (() if teacher is None else (teacher[0],)) + \
        (() if omega0 is None else (omega0,))
    return common.map_in_chunks(body, reports, cfg.text_chunk)


def kept_words(pos_logp: Array, word_mask: Array, spec: StageSpec, cfg: PlanConfig) -> Array:
    """T_a after entropy-based noise suppression on the positive-pair maps. Returns [b, t] bool."""
    if not spec.noise_suppression:
        return word_mask
    p = pos_logp.shape[-1]
    keep = word_mask & (jax.lax.stop_gradient(word_entropy(pos_logp)) <= cfg.ns_entropy * jnp.log(p))
    return jnp.where(jnp.any(keep, axis=-1, keepdims=True), keep, word_mask)


def base_word_weights(out: EncoderOutputs, cfg: PlanConfig) -> Array:
    """omega over all valid words, [b, t] (stop-grad)."""
    if cfg.word_weights == "mgca":
        return common.quantile_clipped_weights(out.word_attn, out.word_mask, *cfg.word_weight_quantiles)
    return local_ops.uniform_word_weights(out.word_mask)


def running_log_prior(method_params, cfg: PlanConfig) -> Optional[Array]:
    """gamma_r * log m: [p] (stop-grad), or None when the running prior is off."""
    if not cfg.running_prior_gamma:
        return None
    m = jax.lax.stop_gradient(local_ops.wide(method_params["map_prior"]))
    return cfg.running_prior_gamma * jnp.log(jnp.maximum(m, 1e-30))


def local_terms(out: EncoderOutputs, teacher_out: Optional[EncoderOutputs], valid: Array, spec: StageSpec,
                cfg: PlanConfig, running: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """Local contrastive loss, consistency loss and fraction of kept words for one stage.

    Args:
      running: [p] scaled log running prior (``running_log_prior``) or None.
    Returns:
      (l_loc [], l_cons [] (0 without teacher prior), kept_fraction []).
    """
    words = local_ops.wide(out.word_emb)
    patches = local_ops.wide(out.patch_emb)
    teacher = None
    if spec.teacher_prior:
        teacher = (jax.lax.stop_gradient(local_ops.wide(teacher_out.word_emb)),
                   jax.lax.stop_gradient(local_ops.wide(teacher_out.patch_emb)))
    omega0 = base_word_weights(out, cfg)
    pixel = (omega0, cfg.pixel_importance) if cfg.pixel_importance else None
    pos_logp = log_maps(words, patches, spec.tau_w, teacher, cfg.prior_gamma, pixel, running)   # [b, t, p]
    keep = kept_words(pos_logp, out.word_mask, spec, cfg)
    omega = jnp.where(keep, omega0, 0.0)
    omega = omega / jnp.maximum(jnp.sum(omega, axis=-1, keepdims=True), 1e-12)
    log_omega = jnp.where(omega > 0, jnp.log(jnp.maximum(omega, 1e-30)), common.NEG_INF)
    r = local_scores(words, log_omega, patches, spec, cfg, teacher, omega0 if pixel else None, running)  # [a, b]
    # A report without any valid word has no local score: it neither counts nor competes here.
    loc_valid = valid & jnp.any(keep, axis=-1)
    l_loc, _, _ = common.bidirectional_ce(r.T / cfg.tau_r, loc_valid, cfg.loc_reduce_directions)
    if spec.teacher_prior:
        student_logp = log_maps(words, patches, spec.tau_w)                            # raw student maps
        teacher_logp = log_maps(*teacher, spec.tau_w)                                   # stop-grad inputs
        kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)     # [b, t]
        l_cons = common.masked_mean(kl, out.word_mask & valid[:, None])
    else:
        l_cons = jnp.zeros((), l_loc.dtype)
    kept_fraction = jnp.sum(keep & valid[:, None]) / jnp.maximum(jnp.sum(out.word_mask & valid[:, None]), 1)
    return l_loc, l_cons, kept_fraction.astype(l_loc.dtype)


def stage_specs(cfg: PlanConfig) -> list[StageSpec]:
    """Static settings of the local stages that the config enables (stage 2, then stage 3)."""
    specs = []
    if cfg.stage2_start_epoch is not None:
        specs.append(StageSpec(cfg.tau_w_stage2, cfg.ns_from_stage <= 2, False))
    if cfg.stage3_start_epoch is not None:
        specs.append(StageSpec(cfg.tau_w_stage3, cfg.ns_from_stage <= 3, True))
    return specs


@OBJECTIVES.register("plan")
def make(cfg, *, steps_per_epoch: int) -> Objective:
    """PLAN objective; see the module docstring for the config fields."""
    settings = local_ops.read_config(PlanConfig, cfg)
    specs = stage_specs(settings)
    starts = [local_ops.epochs_to_steps(e, steps_per_epoch)
              for e in (settings.stage2_start_epoch, settings.stage3_start_epoch) if e is not None]
    ramp_steps = max(local_ops.epochs_to_steps(settings.loc_ramp_epochs, steps_per_epoch), 1)

    running_on = bool(settings.running_prior_gamma)

    def init(rng, out):
        del rng
        if not running_on:
            return {}
        p = out.patch_emb.shape[1]
        return {"map_prior": jnp.full((p,), 1.0 / p, jnp.float32)}

    def trainable(step):
        del step
        return {"map_prior": jnp.asarray(False)}       # a running statistic: no optimiser update or decay

    def update_state(method_params, metrics):
        """m <- mu m + (1 - mu) m_hat after a finite step; removes the non-scalar ``plan/map_batch``."""
        metrics = dict(metrics)
        m_hat = metrics.pop("plan/map_batch")
        mu = settings.running_prior_momentum
        m = method_params["map_prior"]
        return dict(method_params, map_prior=(mu * m + (1.0 - mu) * m_hat).astype(m.dtype)), metrics

    def stage_of(step) -> Array:
        """1, 2 or 3 as a traced int32."""
        step = jnp.asarray(step)
        return 1 + sum((step >= s).astype(jnp.int32) for s in starts) if starts else jnp.asarray(1, jnp.int32)

    def loss(method_params, out: EncoderOutputs, batch: Batch, ctx: LossContext):
        teacher_out = ctx.teacher_out
        if any(s.teacher_prior for s in specs) and teacher_out is None:
            raise ValueError("PLAN stage 3 needs teacher_out (the EMA encoders' outputs), but it is None: set "
                             "method.ema_decay (Objective.ema_decay) so that the train state keeps an EMA "
                             "teacher, or disable stage 3 with method.stage3_start_epoch = None.")
        b = out.img_emb.shape[0]
        valid = batch.get("valid", jnp.ones((b,), bool))
        step = jnp.asarray(ctx.step)
        stage = stage_of(step)
        l_itc, i2t, t2i, _ = common.infonce(local_ops.wide(out.img_emb), local_ops.wide(out.txt_emb),
                                            settings.itc_temperature, valid,
                                            reduce_directions=settings.itc_reduce_directions)
        zero = jnp.zeros((), l_itc.dtype)
        running = running_log_prior(method_params, settings)
        branches = [lambda: (zero, zero, zero)]
        for spec in specs:
            branches.append(lambda spec=spec: local_terms(out, teacher_out, valid, spec, settings, running))
        l_loc, l_cons, kept = jax.lax.switch(stage - 1, branches)
        if starts:
            lam_loc = settings.lambda_loc * jnp.clip((step - starts[0]) / ramp_steps, 0.0, 1.0)
        else:
            lam_loc = zero
        lam_cons = jnp.where(stage >= 3, settings.lambda_cons, 0.0)
        total = l_itc + lam_loc * l_loc + lam_cons * l_cons
        tau_w = jnp.where(stage >= 3, settings.tau_w_stage3, settings.tau_w_stage2)
        metrics = {
            "loss/itc": l_itc, "loss/i2t": i2t, "loss/t2i": t2i, "loss/loc": l_loc, "loss/cons": l_cons,
            "plan/stage": stage.astype(jnp.float32), "plan/lambda_loc": lam_loc,
            "plan/lambda_cons": lam_cons, "plan/tau_w": tau_w, "plan/kept_words": kept,
        }
        if running_on:
            m = local_ops.wide(method_params["map_prior"])
            metrics["plan/map_batch"] = batch_mean_map(local_ops.wide(out.word_emb), local_ops.wide(out.patch_emb),
                                                       out.word_mask, valid, tau_w, m)
            metrics["plan/map_prior_entropy"] = -jnp.sum(m * jnp.log(jnp.maximum(m, 1e-30)))
        return total, metrics

    def similarity_maps(method_params, out: EncoderOutputs) -> Array:
        """[b, t, p] soft maps of the last configured stage (no teacher prior; the pixel-importance and
        running priors when on); non-word rows are 0."""
        spec = specs[-1] if specs else StageSpec(settings.tau_w_stage2, False, False)
        pixel = (base_word_weights(out, settings), settings.pixel_importance) if settings.pixel_importance else None
        a = jnp.exp(log_maps(local_ops.wide(out.word_emb), local_ops.wide(out.patch_emb), spec.tau_w,
                             pixel=pixel, running=running_log_prior(method_params, settings)))
        if spec.noise_suppression:
            a = suppress_noise(a, settings.ns_rel_threshold)
        return jnp.where(out.word_mask[..., None], a, 0.0)

    return Objective(name="plan", init=init, loss=loss, similarity_maps=similarity_maps,
                     ema_decay=settings.ema_decay, trainable=trainable if running_on else None,
                     update_state=update_state if running_on else None)
