"""One's own radiograph through a pretrained run: zero-shot class scores and word-to-region heatmaps.

    from medvlp_jax import inference
    from medvlp_jax.evaluators import common
    run = common.load_run("runs/convirt_demo")            # any workdir: ours, or one written by an importer
    image = inference.load_image(run, "film.dcm")         # [crop, crop, channels], as the evaluators see images
    scores = inference.zero_shot(run, image[None], inference.default_prompts(run))   # [1, classes]
    maps = inference.phrase_heatmaps(run, image, ["left pleural effusion", "enlarged heart"])   # [2, crop, crop]

The image goes through the converters' reader (PNG/JPEG, or DICOM with its rescale, window / VOI LUT and
MONOCHROME1 inversion; ``data/images.py``), resized and padded to the run's ``data.resize`` and centre-cropped
exactly as the evaluation pipeline does (``decode.decode_image``). Scores are cosines between the image
embedding and each class's mean prompt embedding (the zero-shot evaluator's "cosine" mode); maps are the
grounding evaluator's (the method's own word-to-patch maps when it has them, else phrase-patch cosine).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np


def read_radiograph(path: str, size: int) -> np.ndarray:
    """[size, size] uint8/uint16 pixels of a PNG/JPEG/DICOM file, longer side resized to ``size`` and padded.

    Raises:
      images.ImageReadError: naming the file when it cannot be read.
    """
    from medvlp_jax.data import images
    return images.load_for_dataset(path, size)[0]


def model_image(pixels: np.ndarray, data_cfg) -> np.ndarray:
    """[crop, crop, channels] float32 in [-1, 1]: ``pixels`` [h, w] through the evaluation preprocessing."""
    from medvlp_jax.data import decode, images, pipeline
    tf = pipeline.import_tf()
    png = tf.constant(images.encode_png(np.asarray(pixels)))
    image = decode.decode_image(tf, png, resize=data_cfg.resize, crop=data_cfg.crop, channels=data_cfg.channels,
                                  train=False, seed=tf.constant([0, 0], tf.int64), random_flip=False)
    return image.numpy().astype(np.float32)


def load_image(run, path: str) -> np.ndarray:
    """The model input [crop, crop, channels] of a radiograph file for ``run`` (see the module docstring)."""
    return model_image(read_radiograph(path, int(run.config.data.resize)), run.config.data)


def default_prompts(run) -> dict[str, list[str]]:
    """Zero-shot prompts for the classes of the run's data set (its built-in table), else CheXpert's 5 tasks."""
    from medvlp_jax.data import schema
    from medvlp_jax.evaluators import zero_shot
    name = run.config.data.get("name", "")
    try:
        name = schema.read_info(run.config.data.root).get("name", name)
    except (FileNotFoundError, ValueError):
        pass
    return zero_shot.builtin_prompts(name) or dict(zero_shot.CHEXPERT_PROMPTS)


def image_embeddings(run, images: np.ndarray) -> np.ndarray:
    """[n, d] L2-normalised global image embeddings of images [n, crop, crop, channels]."""
    from medvlp_jax.evaluators.dense import batched_apply
    fn = jax.jit(lambda v, b: run.model.apply(v, b, train=False, method="encode_image").img_emb)
    emb = batched_apply(lambda b: fn(run.variables, b), {"image": np.asarray(images, np.float32)}, mesh=run.mesh,
                        batch_size=len(images))
    emb = np.asarray(emb, np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def zero_shot(run, images: np.ndarray, prompts: dict[str, list[str]]) -> np.ndarray:
    """[n, c] cosine scores of images [n, crop, crop, channels] against each class (``prompts`` key order)."""
    from medvlp_jax.evaluators import quick
    classes = quick.class_embeddings(run.config, run.model, run.variables, run.mesh, run.tokenizer, prompts)
    return image_embeddings(run, images) @ classes.T


def phrase_heatmaps(run, image: np.ndarray, phrases: Sequence[str], *, mode: str = "auto") -> np.ndarray:
    """[m, crop, crop] maps of each phrase over one image [crop, crop, channels] (upsampled from the patch grid,
    each cell at the encoder's receptive-field centre as in the grounding evaluator)."""
    from medvlp_jax.evaluators import grounding
    if not phrases:
        raise ValueError("phrase_heatmaps needs at least one phrase")
    stack = np.repeat(np.asarray(image, np.float32)[None], len(phrases), axis=0)
    grids = grounding.phrase_maps(run, stack, list(phrases), mode=mode, batch_size=len(phrases))
    return grounding.upsample_to_crop(run, grids, image.shape[0])[0]


def heatmap_figure(image: np.ndarray, phrases: Sequence[str], maps: np.ndarray, *, title: Optional[str] = None):
    """The image and one heatmap panel per phrase (``viz.phrase_figure``), the maximum of each map marked."""
    from medvlp_jax import viz
    return viz.phrase_figure(image, [(p, m, None) for p, m in zip(phrases, maps)], title=title)


def score_table(classes: Sequence[str], scores: np.ndarray) -> list[tuple[str, float]]:
    """(class, score) sorted best first, for one image's scores [c]."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return [(classes[i], float(scores[i])) for i in order]


def describe(run) -> dict[str, Any]:
    """What a notebook prints about a loaded run: method, step, encoders, the preprocessing it applies."""
    c = run.config
    return {"workdir": run.workdir, "method": c.method.get("name"), "step": run.step,
            "image_encoder": c.model.image.get("name"), "text_layers": c.model.text.get("depth"),
            "image": f"resize {c.data.resize}, centre crop {c.data.crop}, {c.data.channels} channel(s)",
            "max_text_len": c.data.max_text_len}
