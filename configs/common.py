"""Shared defaults of every config: the reference's YFCC15M DeCLIP recipe (model, loss weights,
optimiser and schedule, data pipeline) first, then the operational blocks that do not change what a
step computes: `data.limits` (hostile input) and `runtime` (device, precision, compile, timeouts).

Facts used in several blocks are set once: the image size, the context length and the seed are
field references shared by `model` / `data` and the top level (overriding one changes all), and
every default path follows data.DATA_DIR (`data/` beside the code, or $DECLIP_DATA).
"""
import ml_collections

import data
from declip import R50, ViT_B32, model_config  # noqa: F401  (R50, ViT_B32: the configs' towers)


def base_config(vision, *, declip=True):
    """The reference run (ViT-B/32 or R50 DeCLIP, YFCC15M) as a ConfigDict; `declip=False` is the
    CLIP baseline: same data and schedule, one view, the plain caption, the CLIP loss only."""
    c = ml_collections.ConfigDict()
    image_size = ml_collections.FieldReference(vision['image_size'])
    context_length = ml_collections.FieldReference(77)   # tokens, with start and end
    seed = ml_collections.FieldReference(0)
    c.seed = seed                 # weights, NN queues, augmentation streams; also data.seed
    c.max_iter = 128_001
    c.accum_steps = 1             # k micro-batches a step per device = exactly a job with k times the devices
    c.init_from = ''              # start a new run from these weights (ours, a DeCLIP .pth.tar, OpenAI CLIP)
    c.stop_at = 0                 # end this invocation after this many steps (0: at max_iter)

    c.model = model_config(vision, declip=declip, image_size=image_size, context_length=context_length)

    weights = dict(clip=0.4, simsiam=0.2, mlm=0.2, nn=0.2) if declip else dict(clip=1.0, simsiam=0.0, mlm=0.0, nn=0.0)
    c.loss = ml_collections.ConfigDict(dict(weights, queue_size=65_536))
    c.optim = optim_config()

    c.data = data_config(declip=declip, image_size=image_size, seed=seed, context_length=context_length)

    c.eval = ml_collections.ConfigDict(dict(  # at model.image_size, shorter side resized to 256/224 of it
        prompts='prompt80', batch_size=256, workers=8, precision='fp32'))  # fp32: the published numbers' precision

    c.log_every = 50
    c.ckpt_every = 1_000          # last.pt
    c.keep_every = 20_000         # kept copies step_<N>.pt
    c.keep_copies = 0             # how many kept copies to retain (0: all)
    c.eval_every = 2_000

    c.runtime = runtime_config()
    c.lock()                      # a misspelt or moved key is an error, not a new key nothing reads
    return c


def optim_config():
    """AdamW and the schedule, with the reference's names: the PEAK learning rate is warmup_lr (1e-3),
    reached after warmup_steps of linear warm-up from base_lr (1e-4, the start); a cosine then
    decays it to min_lr at max_iter."""
    return ml_collections.ConfigDict(dict(
        base_lr=1e-4, warmup_lr=1e-3, min_lr=0.0, warmup_steps=2_500, weight_decay=0.1,
        beta1=0.9, beta2=0.98, eps=1e-8))


def data_config(*, declip, image_size, seed, context_length):
    """The data pipeline: sources, DeCLIP's two MoCo-v2 views + EDA + MLM masking (one SLIP view and
    the plain caption for CLIP), the loader, and the hostile-input limits in their own block."""
    return ml_collections.ConfigDict(dict(
        format='jsonl',            # 'jsonl' (YFCC15M meta + image files) or 'wds' (tar shards)
        train_root='', train_meta='',  # comma-separated lists of equal length
        shards='',                 # comma-separated .tar shards: globs, paths, {a,b} lists, {00000..01023} ranges
        shuffle_buffer=2_000,      # samples each loader worker mixes (shards: memory x mean sample size)
        val_root='', val_meta='',  # ImageNet-val layout (JSON Lines with filename/label/label_name)
        image_size=image_size, views=2 if declip else 1,
        # 'moco_v2': crop 0.2-1, flip, colour jitter, grayscale, blur (DeCLIP); 'standard_slip': crop 0.5-1
        # only (the reference's STANDARD_SLIP, which its CLIP configs use)
        augmentation='moco_v2' if declip else 'standard_slip', crop_scale=(0.2, 1.0) if declip else (0.5, 1.0),
        decode='host',             # 'device': JPEG decode + crop/resize on the accelerator (torchvision)
        eda=declip, mask=declip, eda_synonyms=True,
        bpe_path=str(data.BPE_PATH), synonyms_path=str(data.SYNONYMS_PATH),
        batch_size=128, workers=8, prefetch=4, seed=seed, context_length=context_length,
        limits=ml_collections.ConfigDict(dict(  # hostile input: what a bad sample is, when bad ones stop the run
            max_pixels=89_478_485,     # larger images are rejected as decompression bombs
            max_file_bytes=64 << 20,   # larger image files (and tar members) are bad samples
            sample_timeout_s=60.0,     # a sample taking longer is a bad sample (0: no limit)
            batch_timeout_s=1_800.0,   # no batch from the loader workers this long: the run stops with a
                                       # checkpoint (a worker stopped responding; 0: wait forever)
            bad_window=1_000, max_bad_rate=0.1))))  # stop when over 10 % of the last 1,000 samples are bad


def runtime_config():
    """Operational keys: how and where a run executes. None of them changes what a step computes."""
    return ml_collections.ConfigDict(dict(
        device='auto',            # the accelerator torch sees, else CPU; or 'npu' / 'cuda' / 'cpu'
        precision='auto',         # fp32 on CPU, bf16 where supported, else fp16 + loss scaler
        compile='auto',           # torch.compile: 'auto' (on CUDA), 'true', 'false', 'towers', 'model' or
                                  # 'step' (also the objective; docs/speed.md)
        npu_jit_compile='auto',   # NPU online operator compile: 'auto' (torch_npu's own default), 'true' or 'false'
        static_shapes='auto',     # same shapes every step (colour ops over the whole batch, MLM count padded
        mlm_bucket=256,           # to a multiple of mlm_bucket): 'auto' (on NPU while jit compile is on)
        max_nonfinite=20,         # consecutive non-finite losses before a clean stop
        dist_timeout_s=1_800,     # a dead rank makes the others exit after this
        peak_tflops=0.0,          # per-device peak for the MFU figure (0: not logged)
        tb_images=4))             # samples whose two views are logged as images at start


DEMO = data.DATA_DIR / 'demo'


def tiny(c):
    """Shrink a config's encoders to CPU size (the same architecture family; head counts follow
    the width/64 rule that checkpoint loading infers them by)."""
    if c.model.vision == 'vit':
        c.model.update(dict(image_size=64, patch_size=16, vision_width=128, vision_layers=4, vision_heads=2))
    else:
        c.model.update(dict(image_size=64, vision_width=16, vision_layers=(1, 1, 1, 1), vision_heads=8))
    c.model.update(dict(embed_dim=128, context_length=24, text_width=128, text_layers=3, text_heads=2,
                        simsiam_dim=256, predictor_dim=64))
    c.eval.update(dict(batch_size=200, workers=0))
    c.loss.queue_size = 4_096
    return c


def on_demo_data(c):
    c.data.update(dict(format='jsonl', train_root=str(DEMO / 'train'), train_meta=str(DEMO / 'train.jsonl'),
                       shards=str(DEMO / 'shards' / '*.tar'), val_root=str(DEMO / 'val'),
                       val_meta=str(DEMO / 'val.jsonl')))
    return c


def apply_arg(c, arg):
    """`smoke`: a few steps of a tiny variant on the demo data (CPU friendly); `gpu_smoke`: 200
    steps of the full-size encoders on the demo data (one accelerator)."""
    if not arg:
        return c
    if arg == 'gpu_smoke':
        on_demo_data(c)
        c.max_iter = 200
        c.data.update(dict(batch_size=128, workers=8))
        c.eval.update(dict(prompts='prompt6', workers=8))
        c.optim.warmup_steps = 50
        c.log_every, c.ckpt_every, c.keep_every, c.eval_every = 10, 100, 200, 200
        return c
    if arg != 'smoke':
        raise ValueError(f'unknown config argument {arg!r} (known: smoke, gpu_smoke)')
    on_demo_data(tiny(c))
    c.max_iter = 6
    c.data.update(dict(batch_size=8, workers=0))
    c.optim.warmup_steps = 2
    c.log_every, c.ckpt_every, c.keep_every, c.eval_every, c.runtime.tb_images = 2, 3, 3, 6, 2
    c.eval.prompts = 'prompt1'
    return c
