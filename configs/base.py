"""Every config key seqmix knows, with its default and one comment each.

Experiment configs start from `get_config()` here and change what they need. Unknown
keys are rejected (with the nearest valid key suggested), so this file is the list.

    python -m trainer.train --config=configs/base.py --workdir=runs/base

trains the default text task with these defaults (a few minutes on a laptop CPU).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds params, data order and dropout; same seed + same mesh = same run
  c.total_steps = 600  # optimizer steps of the whole run (resume continues up to here)
  c.batch_size = 32  # global batch (examples per step, summed over all devices and hosts)
  c.log_every = 20  # steps between train-metric lines in metrics.jsonl
  c.eval_every = 200  # steps between held-out evaluations (0: only at the end)
  c.eval_examples = 256  # held-out examples per evaluation (the same ones every time)
  c.eval_split = "validation"  # held-out split used during training; `trainer.evaluate` also reports "test"
  c.checkpoint_every = 200  # steps between checkpoints (0: only at the end / on preemption)
  c.keep_checkpoints = 2  # most recent checkpoints kept in DIR/checkpoints
  c.keep_best = True  # also keep the best checkpoint by held-out metric in DIR/best_checkpoint
  # After the last step, evaluate the best checkpoint on validation and test: DIR/eval_results.json and
  # `best/*` in metrics.jsonl (the arena reads them; model selection by validation, never by test).
  c.eval_best_at_end = False
  c.async_checkpointing = True  # write checkpoints in the background while training goes on
  c.on_nonfinite = "stop"  # non-finite loss: "stop" with the step number, or "skip" the update
  c.max_skipped = 20  # on_nonfinite=skip: stop after this many consecutive skipped steps (0: never stop)
  # Resuming with a config that changes what is trained (mixer, sizes, task, batch, seed, ...) is
  # refused; true continues anyway and records the change in metrics.jsonl.
  c.allow_config_change = False
  c.progress_bar = True  # one-line progress bar on stderr (step, loss, tokens/s, ETA)
  # Experiment tracking besides metrics.jsonl and TensorBoard (trainer/metrics.py).
  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = False  # also log to Weights & Biases (pip install 'seqmix[tracking]'; WANDB_MODE=offline works offline)
  c.logging.wandb_project = "seqmix"  # the W&B project
  c.logging.wandb_entity = ""  # the W&B entity (team or user); "" = your default
  c.logging.wandb_name = ""  # the W&B run name; "" = the workdir's name (a resumed run keeps its W&B run)
  # Causal LMs: at each evaluation, greedy continuations of the openings of the first N validation
  # examples, into metrics.jsonl ("samples"), TensorBoard's text tab and W&B (one process only; 0 = off).
  c.logging.samples = 0
  c.logging.sample_tokens = 64  # new tokens per continuation (at most what the trained length allows)
  # jax.profiler traces of chosen train steps, into DIR/profile (TensorBoard's profile plugin, Perfetto).
  c.profile = ml_collections.ConfigDict()
  c.profile.steps = ""  # "A:B": trace train steps A+1..B (the steps after A, up to and including B); "" = off
  c.profile.memory = False  # also save a device memory profile (pprof) when the traced steps end
  c.profile.all_processes = False  # trace every process of a multi-host run (default: process 0 only)

  c.task = ml_collections.ConfigDict()
  c.task.name = "text"  # which task generator; see trainer/data/tasks.py
  c.task.seq_len = 128  # tokens per example (T)
  # Pack several variable-length examples per row (segment ids, per-example positions and
  # loss; trainer/data/packing.py). Held-out splits pack the same eval_examples examples.
  c.task.packing = False
  c.task.packing_window = 4  # W: each train batch packs from B*W stream examples (~ examples per row)
  c.task.text = ml_collections.ConfigDict()  # byte-level LM on CPython's own documentation text
  c.task.listops = ml_collections.ConfigDict()
  c.task.listops.min_len = 500  # keep trees whose token length is > min_len (LRA: 500)
  c.task.listops.max_len = 2000  # ... and < max_len (LRA: 2000); must fit in seq_len
  c.task.listops.max_depth = 10  # maximum nesting of operators
  c.task.listops.max_args = 10  # maximum arguments per operator (minimum is 2)
  c.task.mqar = ml_collections.ConfigDict()
  c.task.mqar.vocab_size = 8192  # keys from the lower half, values from the upper half
  c.task.mqar.num_pairs = 16  # key-value pairs shown (and queried) per example
  c.task.mqar.power_a = 0.01  # power-law exponent of the query gap distribution (Zoology)
  c.task.selective_copy = ml_collections.ConfigDict()
  c.task.selective_copy.num_tokens = 16  # data tokens scattered in noise, copied in order at the end
  c.task.selective_copy.vocab = 16  # distinct data tokens
  c.task.induction = ml_collections.ConfigDict()
  c.task.induction.vocab = 16  # data ids; the trigger appears twice, the answer follows its first time
  # LRA Pathfinder / Path-X, generated (trainer/data/pathfinder.py); -1 = the resolution's default.
  c.task.pathfinder = ml_collections.ConfigDict()
  c.task.pathfinder.resolution = 32  # image side: 32 (Pathfinder), 64, 128 (Path-X); task.seq_len = resolution**2
  c.task.pathfinder.contour_length = -1  # paddles per target snake: difficulty (LRA: 14, the hardest)
  c.task.pathfinder.paddle_length = -1  # pixels per paddle
  c.task.pathfinder.max_turn = -1.0  # largest turn between consecutive paddles (radians)
  c.task.pathfinder.num_distractors = -1  # distractor snakes
  c.task.pathfinder.distractor_length = -1  # paddles per distractor (default contour_length // 3)
  c.task.pathfinder.marker_radius = -1  # endpoint marker radius (pixels)
  # Any prepared TFDS data set (trainer/data/tfds_task.py), read by random access without TensorFlow.
  c.task.tfds = ml_collections.ConfigDict()
  c.task.tfds.name = ""  # e.g. "imdb_reviews", "cifar10" or "NAME/CONFIG:VERSION"
  c.task.tfds.data_dir = ""  # where `tfds build NAME --file_format=array_record` put it ("": TFDS's default)
  c.task.tfds.train_split = "train"  # TFDS split expressions; the three must not share records
  c.task.tfds.validation_split = "validation"  # e.g. "train[90%:]" for a data set without a validation split
  c.task.tfds.test_split = "test"  # the test split (`trainer.evaluate` reports it)
  c.task.tfds.kind = "classify"  # "classify" (input -> label), "match" (two inputs -> label), "lm" (next token)
  c.task.tfds.inputs = "text"  # the input feature
  c.task.tfds.inputs2 = ""  # kind "match": the second input feature
  c.task.tfds.label = "label"  # the label feature (classify / match)
  c.task.tfds.encoding = "bytes"  # "bytes" (UTF-8 text), "grey" (image grey levels), "pixels" (all channels), "tokens"
  c.task.tfds.vocab_size = 0  # encoding "tokens": ids in the feature are in [0, vocab_size)
  c.task.tfds.num_classes = 0  # 0: from the label's ClassLabel feature
  # Your own text: a directory of UTF-8 files (or JSON lines) as a byte-level LM (trainer/data/textdir.py).
  c.task.textdir = ml_collections.ConfigDict()
  c.task.textdir.path = ""  # the directory
  c.task.textdir.glob = "**/*.txt"  # which files (comma-separated patterns); *.jsonl / *.json: one object per line
  c.task.textdir.text_field = "text"  # JSON lines: the field holding each document's text
  c.task.textdir.validation_fraction = 0.05  # documents held out (by a stable hash of their name) for validation
  c.task.textdir.test_fraction = 0.05  # ... and for test
  # LRA Retrieval: AAN citation pairs from the LRA release's TSV files (trainer/data/retrieval.py).
  c.task.retrieval = ml_collections.ConfigDict()
  c.task.retrieval.data_dir = ""  # the release's lra_release/tsv_data directory
  c.task.retrieval.train_file = "new_aan_pairs.train.tsv"  # file names in data_dir, one per split
  c.task.retrieval.validation_file = "new_aan_pairs.eval.tsv"  # (the release calls its validation split "eval")
  c.task.retrieval.test_file = "new_aan_pairs.test.tsv"  # (see train_file)

  # The input pipeline (trainer/data/pipeline.py, grain): batches are made ahead of the train loop.
  c.data = ml_collections.ConfigDict()
  c.data.threads = 2  # threads making batches ahead (0: made in the train loop's thread, on demand)
  c.data.prefetch = 4  # batches made ahead of use (per worker process when data.workers > 0)
  c.data.workers = 0  # worker processes making batches (0: threads only); for Python-heavy generators

  c.model = ml_collections.ConfigDict()
  c.model.mixer = "attention"  # token mixer of every layer; see layers/mixers.py
  c.model.mixer_schedule = ""  # comma-separated per-layer mixers, cycled (overrides mixer); "mixer" = model.mixer
  # Layouts per mixer: while model.mixer is NAME, `model.schedule_for.NAME` (a schedule as above; ""
  # = NAME in every layer) replaces mixer_schedule, so one config gives each mixer family its
  # paper's layout (configs/mqar.py: a conv layer in front of attention-like mixers, none for Mamba).
  # A model.mixer_schedule given on the command line wins over the entry.
  c.model.schedule_for = ml_collections.ConfigDict()
  c.model.num_layers = 4  # MetaFormer blocks
  c.model.d_model = 128  # residual width (D)
  c.model.num_heads = 4  # query heads (N); head dim H = d_model / num_heads
  c.model.num_kv_heads = 0  # key/value heads (K) for grouped-query attention; 0 = num_heads
  c.model.mlp_ratio = 4  # MLP hidden F = mlp_ratio * d_model
  c.model.mlp = "gelu"  # "gelu" (two matrices), "swiglu" (three, gated) or "none" (no MLP: the reference Mamba block)
  c.model.norm = "rmsnorm"  # pre-norm type: "rmsnorm", "layernorm" or "prepbn" (SLAB: LayerNorm -> BatchNorm)
  c.model.prepbn = ml_collections.ConfigDict()  # norm="prepbn": gamma LN(x) + (1 - gamma) RepBN(x) in training
  c.model.prepbn.total_steps = 0  # steps over which gamma falls from r0 to 0 after warm-up (0: total_steps)
  c.model.prepbn.warmup_steps = 0  # steps of pure LayerNorm first
  c.model.prepbn.r0 = 1.0  # gamma at the start of the decay
  c.model.positions = "rope"  # "rope" (rotary in attention), "learned" (added embedding) or "none"
  c.model.dropout = 0.0  # dropout on residual branches during training
  c.model.pooling = "mean"  # classifier pooling: "mean" over real tokens or "cls" (first token)
  c.model.tie_embeddings = True  # LM head reuses the token embedding matrix
  c.model.dtype = "float32"  # activation/compute dtype ("bfloat16" on accelerators); params stay fp32
  # Per-mixer settings live in `model.<mixer name>` groups, passed to that mixer only.
  c.model.flash = ml_collections.ConfigDict()
  c.model.flash.block_q = 128  # query rows per block
  c.model.flash.block_k = 128  # key/value rows per block streamed past each query block
  c.model.flash.per_row = False  # run rows one by one so each skips its own padding / cross-example blocks (CPU)
  c.model.flash.decode_chunk = 256  # KV-cache slots per split in split-KV decode attention
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.decode_chunk = 256  # KV-cache slots per split in split-KV decode attention
  c.model.local = ml_collections.ConfigDict()
  c.model.local.window = 128  # w: bidirectional |i-j| <= w/2, causal 0 <= i-j < w
  c.model.local.block = 0  # block rows for the blockwise computation (0 = w // 2)
  c.model.bigbird = ml_collections.ConfigDict()
  c.model.bigbird.block = 64  # b: tokens per block
  c.model.bigbird.num_global = 2  # g global blocks: the first ceil(g/2) and the last floor(g/2)
  c.model.bigbird.num_random = 3  # r random blocks per query block and head (fixed per layer)
  c.model.bigbird.seed = 0  # with the layer index, fixes the random blocks
  c.model.block_sparse = ml_collections.ConfigDict()
  c.model.block_sparse.block = 64  # tokens per block (query and key)
  c.model.block_sparse.pattern = "local"  # "local" | "strided" | "random" | "full" (dense, for ablations)
  c.model.block_sparse.radius = 1  # local/strided: neighbouring blocks on each side (causal: earlier side only)
  c.model.block_sparse.stride = 4  # strided: also every stride-th block counted from the query block
  c.model.block_sparse.num_random = 2  # random: random blocks per query block and head, besides the diagonal
  c.model.block_sparse.seed = 0  # random: with the layer index, fixes the random blocks
  c.model.xattention = ml_collections.ConfigDict()
  c.model.xattention.block = 128  # B: block size (the paper's kernel uses 128)
  c.model.xattention.stride = 8  # S: antidiagonal stride for block scoring; block must be a multiple
  c.model.xattention.threshold = 0.9  # tau: keep blocks until this share of each row's scored mass (1.0 = exact)
  c.model.xattention.max_blocks = 0  # cap on kept blocks per query block (0 = no cap)
  # whose queries score query block I: 'block' (the paper: its own; outputs then depend on later tokens of
  # the block), 'previous' (block I-1's: strictly causal), 'auto' ('previous' if causal, else 'block')
  c.model.xattention.selection = "auto"
  c.model.sparse_transformer = ml_collections.ConfigDict()
  c.model.sparse_transformer.pattern = "strided"  # "strided" (last l + every l-th) or "fixed" (own block + last c of each)
  c.model.sparse_transformer.stride = 0  # l; 0 = ceil(sqrt(T)), which makes the cost O(T sqrt T)
  c.model.sparse_transformer.c = 8  # fixed pattern: summary positions at the end of each block (clipped to l)
  c.model.sparse_transformer.head_mode = "split"  # "split" (half the heads per sub-pattern), "merged", "alternate"
  c.model.longformer = ml_collections.ConfigDict()
  c.model.longformer.window = 256  # w: bidirectional |i-j| <= w/2, causal 0 <= i-j < w
  c.model.longformer.dilation = 1  # window offsets are multiples of this
  c.model.longformer.global_positions = (0,)  # row indices with global attention (own Q/K/V); () = none
  c.model.combiner = ml_collections.ConfigDict()
  c.model.combiner.span = 0  # s tokens per span (Combiner-Fixed); 0 = ceil(sqrt(T))
  c.model.combiner.summary = "identity-max"  # span pooling: {identity,relu}-{max,mean,sum}
  c.model.swin = ml_collections.ConfigDict()
  c.model.swin.window = 8  # M: windows of M tokens (1-D) or M x M cells (2-D)
  c.model.swin.grid = (0, 0)  # (h, w) 2-D layout with T = h*w; (0, 0) = the task's image grid, else 1-D
  c.model.linear = ml_collections.ConfigDict()
  c.model.linear.chunk = 64  # C: causal chunk length (intra-chunk C x C products, state carried across)
  c.model.linear.eps = 1e-6  # added to the denominator phi(q) . sum phi(k)
  c.model.performer = ml_collections.ConfigDict()
  c.model.performer.features = 256  # m: positive orthogonal random features; one W [m, head_dim] per layer
  c.model.performer.redraw_every = 1000  # steps per draw: W from (feature_seed, layer, step // redraw_every); 0 = never
  c.model.performer.feature_seed = 0  # seed of the feature draws (W is recomputed each call, never a parameter)
  c.model.performer.chunk = 64  # C: causal chunk length (as model.linear)
  c.model.performer.eps = 1e-6  # added to the denominator phi(q) . sum phi(k)
  c.model.ecoformer = ml_collections.ConfigDict()
  c.model.ecoformer.anchors = 25  # m: kernel anchors per head
  c.model.ecoformer.bits = 16  # b: hash code bits; similarity s_ij = h_i.h_j + b + 1 > 0
  c.model.ecoformer.hash_topk = 10  # fit_hash targets: +1 / -1 for each token's k most / least similar tokens
  c.model.ecoformer.hash_iters = 100  # fit_hash: Nesterov-SGD steps per bit on the relaxed codes
  c.model.ecoformer.hash_lr = 5e-4  # fit_hash: SGD learning rate (the paper's value)
  c.model.ecoformer.hash_momentum = 0.9  # fit_hash: Nesterov momentum
  c.model.ecoformer.hash_tokens = 1024  # fit_hash: valid tokens sampled from the batch (tokens x tokens per head)
  c.model.ecoformer.hash_seed = 0  # fit_hash's default key (folded with the layer index)
  c.model.ecoformer.chunk = 64  # C: causal chunk length
  c.model.ecoformer.eps = 1e-6  # added to the denominator
  c.model.transnormer = ml_collections.ConfigDict()
  c.model.transnormer.diag_layers = -1  # layers with index < this use DiagAttention, later NormAttention; -1 = L // 2
  c.model.transnormer.kernel = "1+elu"  # NormAttention phi: "1+elu" (T2) or "elu" (plain ELU, as T1's code uses)
  c.model.transnormer.diag = "softmax"  # DiagAttention: "softmax" (T2) or "relu" (T1: ReLU scores, then SimpleRMSNorm)
  c.model.transnormer.block = 64  # w: DiagAttention chunk length, counted from each segment's start
  c.model.transnormer.chunk = 64  # C: NormAttention causal scan chunk
  c.model.sla = ml_collections.ConfigDict()
  c.model.sla.grid = (0, 0)  # (h, w), T = h*w: 2-D k x k depth-wise conv on V (bidirectional); (0, 0) = the task's image grid, else 1-D
  c.model.sla.conv_kernel = 5  # k: depth-wise conv taps; centred when bidirectional, left-only when causal
  c.model.sla.chunk = 64  # C: causal scan chunk
  c.model.sla.eps = 1e-6  # added to the denominator
  c.model.linformer = ml_collections.ConfigDict()
  c.model.linformer.k = 64  # projected length: K' = E K, V' = F V with E, F in R^{k x max_len}
  c.model.linformer.share_kv = False  # True: F = E (one projection for keys and values)
  c.model.reformer = ml_collections.ConfigDict()
  c.model.reformer.n_buckets = 8  # hash buckets per round (1 or even): h(x) = argmax([xR; -xR])
  c.model.reformer.chunk = 64  # c: tokens per chunk of the sorted sequence
  c.model.reformer.n_hashes = 2  # hash rounds, combined by softmax over rounds of their log-sum-exps
  c.model.reformer.seed = 0  # with the layer index, fixes the random rotations (one per round and head)
  c.model.reformer.dedup = True  # lower each logit by log(rounds that found the key): one softmax over the union
  c.model.reformer.same_bucket = False  # bidirectional: also require the same bucket inside the chunk window
  c.model.sinkhorn = ml_collections.ConfigDict()
  c.model.sinkhorn.block = 64  # b: tokens per block (lengths padded internally to a multiple)
  c.model.sinkhorn.iters = 5  # Sinkhorn rounds (row then column normalisation, log space)
  c.model.sinkhorn.temperature = 0.75  # P = Sinkhorn((R + noise) / temperature)
  c.model.sinkhorn.gumbel = False  # Gumbel noise on the sorting logits in training
  c.model.sinkhorn.hidden = 0  # sorting-network width; 0 = d_model
  c.model.synthesizer = ml_collections.ConfigDict()
  c.model.synthesizer.kind = "dense"  # "dense": B_i = W2 relu(W1 x_i) per head; "random": a learned table R per head
  c.model.synthesizer.hidden = 0  # width of W1 (dense kind); 0 = d_model
  c.model.mamba = ml_collections.ConfigDict()
  c.model.mamba.d_state = 16  # S: SSM state size per channel
  c.model.mamba.expand = 2  # inner width E = expand * d_model
  c.model.mamba.d_conv = 4  # causal depth-wise conv width
  c.model.mamba.dt_rank = 0  # low rank of the delta projection; 0 = ceil(d_model / 16)
  c.model.mamba.scan = "chunked"  # "chunked" (O(chunk) state memory) | "associative" | "sequential" (reference)
  c.model.mamba.chunk = 64  # tokens per chunk for scan="chunked" (inside a chunk: a token loop on CPU, else associative)
  c.model.mamba.dt_min = 0.001  # initial delta is log-uniform in [dt_min, dt_max]
  c.model.mamba.dt_max = 0.1  # (see dt_min)
  # Projection init: "default" (N(0, 1/fan_in)), "reference" (the reference Mamba model's: PyTorch's
  # uniform Linear init, W_out / sqrt(branches * layers)) or "zoology" (N(0, 0.02), zero biases).
  c.model.mamba.init = "default"
  c.model.mamba2 = ml_collections.ConfigDict()
  c.model.mamba2.d_state = 128  # N: state size per head and channel (the SSD paper's 128)
  c.model.mamba2.head_dim = 64  # P: channels per head; must divide expand * d_model (heads H = E / P)
  c.model.mamba2.expand = 2  # inner width E = expand * d_model
  c.model.mamba2.groups = 1  # G: groups of heads sharing B and C (must divide H)
  c.model.mamba2.d_conv = 4  # causal depth-wise conv width over [x, B, C]
  c.model.mamba2.scan = "chunked"  # "chunked" (the SSD matmul form) | "sequential" (a token loop, the reference)
  c.model.mamba2.chunk = 64  # tokens per chunk of the chunked form (the reference code uses 256 on GPUs)
  c.model.mamba2.dt_min = 0.001  # initial dt is log-uniform in [dt_min, dt_max]
  c.model.mamba2.dt_max = 0.1  # (see dt_min)
  c.model.mamba2.a_min = 1.0  # A = -a, a drawn uniformly from [a_min, a_max] per head
  c.model.mamba2.a_max = 16.0  # (see a_min)
  c.model.mamba2.init = "default"  # W_in, W_out: "default" | "reference" (PyTorch's Linear init) | "zoology"
  c.model.lmu = ml_collections.ConfigDict()
  c.model.lmu.memory_size = 0  # q: Legendre order; 0 = d_model (LMUFormer)
  c.model.lmu.theta = 128.0  # memory window in tokens (LMUFormer: 128)
  c.model.lmu.impl = "auto"  # "auto" (direct up to direct_max_len, else fft) | "fft" | "direct" | "chunked" | "recurrent"
  c.model.lmu.direct_max_len = 128  # longest row for the O(T^2) direct convolution under impl="auto"
  c.model.lmu.chunk = 64  # tokens per chunk for impl="chunked" (and the fft's packed-row fallback)
  c.model.lmu.norm = "batchnorm"  # "batchnorm" (LMUFormer's projection BN, statistics in the train state) | "none"
  c.model.conv = ml_collections.ConfigDict()  # gated short convolution (Zoology's BaseConv)
  c.model.conv.kernel = 3  # taps per channel (causal: t-k+1..t; bidirectional: centred)
  c.model.conv.gate = True  # y = (x W + b) * conv(x) (BaseConv); False: y = conv(x) alone
  c.model.synthesizer.fixed = False  # random kind: R drawn at init and not trained (kept outside the params)
  # How `attention` computes: "xla" (dense reference), "flash" (pure-JAX blockwise, O(T) memory),
  # "pallas" (fused kernels: Triton on GPU, Mosaic on TPU, interpret mode elsewhere; also the ring's
  # inner step and the block-sparse mixers' kernel), "cudnn" (jax.nn.dot_product_attention's fused cuDNN
  # kernel for rows of one example + padding, blockwise for packed batches; NVIDIA GPU and bfloat16 only),
  # "mgpu" (the Hopper Mosaic GPU kernels of kernels/flash_mgpu.py for `attention`'s full-sequence pass,
  # pallas everywhere else; NVIDIA Hopper GPU, bfloat16, head dim 64 or 128; not yet timed on a GPU)
  # or "auto" (pallas on GPU and TPU, else flash).
  c.model.attention_impl = "xla"
  # What each block keeps for the backward pass (layers/remat.py): "none" (everything), "full" (only the
  # block's input; the block is recomputed), "dots" (every matrix product's output), "dots_no_batch"
  # (only the weight products' outputs) or "offload" (those, in pinned host memory). --dry_run shows the effect.
  c.model.remat = "none"
  # Run each stretch of consecutive identical blocks as one lax.scan over their stacked parameters: the
  # model's program holds one block whatever the depth, and on CPU remat needs it to lower memory
  # (layers/models.py); parameters and checkpoints are unchanged. Alone it raises temporaries: pair it
  # with model.remat.
  c.model.scan_blocks = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3  # peak learning rate after warmup
  c.optimizer.schedule = "cosine"  # after warmup: "cosine" to end_lr_ratio, "rsqrt" or "constant"
  c.optimizer.warmup_steps = 50  # linear warmup from 0
  c.optimizer.end_lr_ratio = 0.1  # cosine ends at learning_rate * end_lr_ratio
  c.optimizer.weight_decay = 0.05  # AdamW decoupled decay, applied to matrices only (not norms/biases)
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.98  # Adam beta2
  c.optimizer.eps = 1e-8  # Adam epsilon
  c.optimizer.grad_clip = 1.0  # global-norm gradient clipping (0: off)
  # k micro-batches of batch_size / k per optimizer step, gradients summed in one compiled step
  # (same update as the whole batch, in less activation memory); 1 = off.
  c.optimizer.grad_accum_steps = 1

  c.parallel = ml_collections.ConfigDict()
  # How attention handles a length split over mesh.sequence > 1: "auto" (the compiler's
  # sharding propagation, which gathers K/V), "ring", "all_to_all" (Ulysses), "all_gather", or
  # "scan" (recurrent mixers: per-device chunk scans combined across devices), "halo" (short
  # convolutions: the k - 1 tokens beside each chunk from the neighbours); the default for every mixer.
  c.parallel.sequence_strategy = "auto"
  # Per-mixer strategies overriding the default, "MIXER=STRATEGY,..." (e.g. "mamba=scan" in a schedule
  # of attention and mamba under ring). A mixer the default does not apply to and that has one
  # implicit strategy (halo, for conv) takes it without being named here.
  c.parallel.sequence_overrides = ""
  c.parallel.load_balance = True  # causal + ring: store rows in zigzag order so every device does equal work

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel replicas (-1: all devices not used by the other axes)
  c.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3 style); also splits the batch
  c.mesh.tensor = 1  # Megatron tensor parallelism over heads and MLP hidden
  c.mesh.sequence = 1  # sequence (context) parallelism over the length axis
  # Logical axis -> mesh axes, as data (layers name logical axes only). A logical axis
  # whose size is not divisible by its mesh axes is replicated instead.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("length", "sequence"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("head_dim", None),
      ("state", None),
      ("classes", None),
  )
  return c


def shrink_to_smoke(c):
  """The `:smoke` settings every config shares: one tiny layer, 6 steps, seconds on a CPU."""
  c.model.num_layers = 1
  c.model.d_model = 32
  c.batch_size = 8
  c.total_steps = 6
  c.eval_every = 3
  c.checkpoint_every = 3
  c.eval_examples = 16
  c.log_every = 2
  return c


def lra_size(c, arg, config_name: str, small_d_model: int):
  """The `:small` (1k tokens, 2 layers, 2000 cosine steps) and `:smoke` sizes shared by the LRA
  text-like configs; no argument keeps the LRA settings; anything else is a ValueError."""
  if arg == "small":
    c.task.seq_len = 1024
    c.model.num_layers = 2
    c.model.d_model = small_d_model
    c.total_steps = 2000
    c.eval_every = 500
    c.checkpoint_every = 500
    c.eval_examples = 1024
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 200
  elif arg == "smoke":
    c.task.seq_len = 128
    shrink_to_smoke(c)
    c.optimizer.warmup_steps = 2
    c.optimizer.schedule = "cosine"
  elif arg:
    raise ValueError(f"configs/{config_name} takes no argument, 'small' or 'smoke', not {arg!r}")
  return c
