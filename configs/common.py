"""Shared defaults of every config: the reference's YFCC15M DeCLIP recipe (spec sections 1, 2, 6, 7)."""
from pathlib import Path

import ml_collections

DATA = Path(__file__).resolve().parents[1] / 'data'

ViT_B32 = dict(vision='vit', embed_dim=512, image_size=224, patch_size=32, vision_width=768,
               vision_layers=12, vision_heads=12)
R50 = dict(vision='resnet', embed_dim=1024, image_size=224, patch_size=32, vision_width=64,
           vision_layers=(3, 4, 6, 3), vision_heads=32)


def base_config(vision, *, declip=True):
    """The reference run (ViT-B/32 or R50 DeCLIP, YFCC15M) as a ConfigDict; `declip=False` is the
    CLIP baseline: same data and schedule, one view, the plain caption, the CLIP loss only."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.max_iter = 128_001
    c.precision = 'auto'  # bf16 on accelerators, fp32 on CPU; or 'bf16' / 'fp16' / 'fp32'
    c.compile = False

    c.model = ml_collections.ConfigDict(dict(
        vision, freeze_conv1=True, concat_views=False, context_length=77, vocab_size=49409,
        text_width=512, text_layers=12, text_heads=8, declip=declip, simsiam_dim=1024,
        predictor_dim=512))

    weights = dict(clip=0.4, simsiam=0.2, mlm=0.2, nn=0.2) if declip else dict(clip=1.0, simsiam=0.0, mlm=0.0, nn=0.0)
    c.loss = ml_collections.ConfigDict(dict(weights, queue_size=65_536))

    c.data = ml_collections.ConfigDict(dict(
        format='jsonl',            # 'jsonl' (YFCC15M meta + image files) or 'wds' (tar shards)
        train_root='', train_meta='',  # comma-separated lists of equal length
        shards='',                 # comma-separated glob patterns of .tar shards
        val_root='', val_meta='',  # ImageNet-val layout (JSON Lines with filename/label/label_name)
        image_size=224, views=2 if declip else 1, crop_scale=(0.2, 1.0),
        eda=declip, mask=declip, eda_synonyms=True,
        bpe_path=str(DATA / 'bpe_simple_vocab_16e6.txt.gz'),
        synonyms_path=str(DATA / 'wordnet_synonyms.tsv.gz'),
        batch_size=128, workers=8, prefetch=4, seed=0,
        max_pixels=89_478_485,     # larger images are rejected as decompression bombs
        bad_window=1_000, max_bad_rate=0.1))

    c.optim = ml_collections.ConfigDict(dict(
        base_lr=1e-4, warmup_lr=1e-3, min_lr=0.0, warmup_steps=2_500, weight_decay=0.1,
        beta1=0.9, beta2=0.98, eps=1e-8))
    return c
