"""The whole pipeline against diffusers' StableDiffusionPipeline: same weights, same initial latents."""
import numpy as np
import pytest
import torch

from reference import SCHEDULER, VOCAB_DIR
from stable_diffusion.pipeline import StableDiffusionPipeline
from stable_diffusion.loading import load_models


@pytest.fixture(scope="module")
def pipelines(sd1_folder, sd1_reference):
    from diffusers import DDIMScheduler, PNDMScheduler
    from diffusers import StableDiffusionPipeline as Reference
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(f"{VOCAB_DIR}/vocab.json", f"{VOCAB_DIR}/merges.txt", model_max_length=77)

    def reference(sampler):
        scheduler = {"plms": PNDMScheduler, "ddim": DDIMScheduler}[sampler].from_config(SCHEDULER)
        return Reference(vae=sd1_reference["vae"], text_encoder=sd1_reference["text_encoder"], tokenizer=tokenizer,
                         unet=sd1_reference["unet"], scheduler=scheduler, safety_checker=None,
                         feature_extractor=None, requires_safety_checker=False)

    engines = {engine: StableDiffusionPipeline(load_models(sd1_folder), engine=engine)
               for engine in ("eager", "inference")}
    return engines, reference


@pytest.mark.parametrize("engine", ["eager", "inference"])
@pytest.mark.parametrize("sampler", ["plms", "ddim"])
@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
@pytest.mark.parametrize("width,height", [(64, 64), (48, 72)])
def test_images_match_diffusers(pipelines, engine, sampler, negative_prompt, width, height):
    engines, reference = pipelines
    ours = engines[engine]
    prompt = "a watercolor painting of a fox in the snow"
    latents = np.random.default_rng(3).standard_normal(ours.latent_shape(2, height, width)).astype(np.float32)
    expected = reference(sampler)(prompt, negative_prompt=negative_prompt, height=height, width=width,
                                  num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2,
                                  latents=torch.from_numpy(latents), output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    images, frames = ours(prompt, negative_prompt=negative_prompt or "", height=height, width=width, batch_size=2,
                          num_inference_steps=6, guidance_scale=7.5, sampler=sampler, eta=0.0, seed=0,
                          latents=latents, progress=False)
    assert images.shape == (2, height, width, 3) and images.dtype == np.uint8
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    print(f"{engine} {sampler} {width}x{height} negative={negative_prompt is not None}: "
          f"max uint8 difference {difference}")
    assert difference <= 2
    assert expected.std() > 5, "the reference image is flat: the comparison would prove little"


def test_guidance_off_uses_the_prompt_alone(pipelines):
    engines, reference = pipelines
    ours = engines["eager"]
    latents = np.random.default_rng(4).standard_normal(ours.latent_shape(1, 64, 64)).astype(np.float32)
    expected = reference("plms")("a red car", height=64, width=64, num_inference_steps=3, guidance_scale=1.0,
                                 latents=torch.from_numpy(latents), output_type="np").images
    images, _ = ours("a red car", height=64, width=64, num_inference_steps=3, guidance_scale=1.0, sampler="plms",
                     seed=0, latents=latents, progress=False)
    assert np.abs(images.astype(int) - (expected * 255).round().astype(int)).max() <= 2


def test_frames_every_display_rate_steps(pipelines):
    ours = pipelines[0]["inference"]
    house = dict(height=64, width=64, num_inference_steps=6, guidance_scale=7.5, sampler="ddim", seed=1, display_rate=2,
                 progress=False)
    _, frames = ours("a house", **house)
    assert [step for step, _ in frames] == [2, 4, 6]
    assert all(images.shape == (1, 64, 64, 3) for _, images in frames)
    _, vae_frames = ours("a house", frame_decoder="vae", **house)
    np.testing.assert_array_equal(vae_frames[-1][1], frames[-1][1])  # the final image is the VAE's either way
    assert not np.array_equal(vae_frames[0][1], frames[0][1])


def test_compiled_models_match_eager_and_are_cached(sd1_folder, tmp_path, monkeypatch):
    import os
    import paddle
    from stable_diffusion.cpu.compiled import compile_for_cpu
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    eager = load_models(sd1_folder)
    ids = paddle.to_tensor(np.array([eager.tokenizer("a fox in the snow"), eager.tokenizer("")], np.int64))
    sample = paddle.randn([2, 4, 9, 7])
    context = paddle.randn([2, 77, 32])
    expected_context = eager.text_encoder(ids).numpy()
    expected = eager.unet(sample, 321.0, context).numpy()
    expected_image = eager.vae.decode(sample).numpy()
    image = paddle.rand([2, 3, 24, 16]) * 2 - 1
    expected_mean, expected_logvar = (m.numpy() for m in eager.vae.encode(image))
    token_embeds = eager.text_encoder.embed_tokens(ids)
    text_encoder, unet, encode, decode = compile_for_cpu(load_models(sd1_folder), threads=2)
    mean, logvar = encode(image)
    for got, want in [(text_encoder(token_embeds)[-1], expected_context), (unet(sample, 321.0, context), expected),
                      (decode(sample), expected_image), (mean, expected_mean), (logvar, expected_logvar)]:
        assert np.abs(got.numpy() - want).max() <= 1e-4 * np.abs(want).max()
    (key,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / key)) == ["text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"]
    compile_for_cpu(load_models(sd1_folder), threads=2)  # the second time loads the cached graphs
    assert os.listdir(tmp_path) == [key]


def test_graph_cache_key_follows_weights_and_traced_code(sd1_folder, tmp_path, monkeypatch):
    import os
    import stable_diffusion.cpu.compiled as compiled
    code = tmp_path / "layers.py"
    code.write_text("x = 1\n")
    monkeypatch.setattr(compiled, "TRACED_SOURCES", [str(code)])
    key = compiled.weights_fingerprint(sd1_folder)
    assert compiled.weights_fingerprint(sd1_folder) == key
    code.write_text("x = 2\n")
    assert compiled.weights_fingerprint(sd1_folder) != key
    key = compiled.weights_fingerprint(sd1_folder)
    config = os.path.join(sd1_folder, "unet", "config.json")
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert compiled.weights_fingerprint(sd1_folder) != key
    key = compiled.weights_fingerprint(sd1_folder)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    assert compiled.weights_fingerprint(sd1_folder, adapters=(str(lora), "weight 0.8")) != key
    assert compiled.weights_fingerprint(sd1_folder, adapters=(str(lora), "weight 0.5")) != \
        compiled.weights_fingerprint(sd1_folder, adapters=(str(lora), "weight 0.8"))


def test_compiled_graphs_run_on_one_thread_whoever_calls(sd1_folder, tmp_path, monkeypatch):
    # oneDNN caches a reordered copy of the weights per calling thread: a thread per request
    # (hub serving) would pay for that copy on every request.
    import threading
    import paddle
    from stable_diffusion.cpu.compiled import CompiledLayer, compile_for_cpu
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    _, unet, _, _ = compile_for_cpu(load_models(sd1_folder), threads=1)
    ran_on = []
    run = CompiledLayer.run
    monkeypatch.setattr(CompiledLayer, "run", lambda self, arrays: ran_on.append(threading.get_ident())
                        or run(self, arrays))
    sample, context = paddle.randn([2, 4, 8, 8]), paddle.randn([2, 77, 32])
    expected = unet(sample, 500.0, context).numpy()
    callers, results = [], []

    def call():
        callers.append(threading.get_ident())
        results.append(unet(sample, 500.0, context).numpy())

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        thread.join()
    assert len(set(ran_on)) == 1 and ran_on[0] not in callers + [threading.get_ident()]
    assert all(np.array_equal(result, expected) for result in results)


def test_compiled_layer_starts_a_fresh_cache_when_the_image_size_changes(sd1_folder, tmp_path, monkeypatch):
    # oneDNN keeps a copy of the weights per input shape for the predictor's life: a new size gets a new one.
    import paddle
    from stable_diffusion.cpu.compiled import compile_for_cpu
    monkeypatch.setenv("STABLE_DIFFUSION_CACHE", str(tmp_path))
    eager = load_models(sd1_folder)
    small, large = paddle.randn([1, 4, 8, 8]), paddle.randn([1, 4, 9, 7])
    expected_small, expected_large = eager.vae.decode(small).numpy(), eager.vae.decode(large).numpy()
    _, _, _, decode = compile_for_cpu(load_models(sd1_folder), threads=1)
    first = decode(small).numpy()
    predictor = decode.predictor
    np.testing.assert_array_equal(decode(small).numpy(), first)
    assert decode.predictor is predictor
    got_large = decode(large).numpy()
    assert decode.predictor is not predictor
    assert np.abs(got_large - expected_large).max() <= 1e-4 * np.abs(expected_large).max()
    np.testing.assert_array_equal(decode(small).numpy(), first)
    assert np.abs(first - expected_small).max() <= 1e-4 * np.abs(expected_small).max()


def test_cpu_threads_ignore_the_one_thread_paddle_sets_on_import(monkeypatch):
    import os
    from stable_diffusion.pipeline import cpu_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `import paddle` sets when the user left it unset
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3


@pytest.mark.parametrize("engine", ["eager", "inference"])
@pytest.mark.parametrize("sampler,cutoff", [("plms", 0.4), ("unipc", 0.25)])
def test_guidance_cutoff_matches_diffusers_callback(pipelines, sd1_reference, engine, sampler, cutoff):
    """Guidance stops after a fraction of the steps, as diffusers' SDCFGCutoffCallback stops it."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.callbacks import SDCFGCutoffCallback
    engines, reference = pipelines
    theirs = reference("plms")
    if sampler == "unipc":
        theirs.scheduler = UniPCMultistepScheduler.from_config(SCHEDULER)
    run = dict(height=64, width=64, num_inference_steps=8, guidance_scale=7.5)
    latents = np.random.default_rng(9).standard_normal(engines[engine].latent_shape(1, 64, 64)).astype(np.float32)
    expected = theirs("a fox in the snow", latents=torch.from_numpy(latents), output_type="np",
                      callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=cutoff), **run).images
    expected = (expected * 255).round().astype(np.uint8)
    images, _ = engines[engine]("a fox in the snow", sampler=sampler, latents=latents, progress=False,
                                guidance_cutoff=cutoff, **run)
    if engine == "inference":  # guided (batch 2) and unguided (batch 1) steps share one predictor
        predictor = engines[engine].unet.graph.predictor
        engines[engine]("a fox in the snow", sampler=sampler, latents=latents, progress=False, guidance_cutoff=cutoff,
                        **run)
        assert engines[engine].unet.graph.predictor is predictor
    full, _ = engines[engine]("a fox in the snow", sampler=sampler, latents=latents, progress=False, **run)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    print(f"{sampler} cut off at {cutoff} ({engine}): max uint8 difference {difference}")
    assert difference <= 2
    assert np.abs(full.astype(int) - expected.astype(int)).max() > 2  # the cut-off changes the picture


@pytest.mark.parametrize("engine", ["eager", "inference"])
@pytest.mark.parametrize("interval", [2, 3])
def test_deep_cache_matches_the_deepcache_package(pipelines, engine, interval):
    """DeepCache (branch 0, uniform interval) against the DeepCache package's DeepCacheSDHelper on
    diffusers' pipeline, with DDIM (the helper finds a step by its timestep; PLMS repeats one)."""
    from DeepCache import DeepCacheSDHelper
    engines, reference = pipelines
    theirs = reference("ddim")
    helper = DeepCacheSDHelper(pipe=theirs)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    run = dict(height=64, width=64, num_inference_steps=7, guidance_scale=7.5)
    latents = np.random.default_rng(11).standard_normal(engines[engine].latent_shape(1, 64, 64)).astype(np.float32)
    try:
        expected = theirs("a fox in the snow", latents=torch.from_numpy(latents), output_type="np", **run).images
    finally:
        helper.disable()
    expected = (expected * 255).round().astype(np.uint8)
    images, _ = engines[engine]("a fox in the snow", sampler="ddim", latents=latents, progress=False,
                                deep_cache_interval=interval, **run)
    full, _ = engines[engine]("a fox in the snow", sampler="ddim", latents=latents, progress=False, **run)
    difference = np.abs(images.astype(int) - expected.astype(int)).max()
    print(f"DeepCache every {interval} steps ({engine}): max uint8 difference {difference}")
    assert difference <= 2
    assert np.abs(full.astype(int) - expected.astype(int)).max() > 2  # the shallow steps change the picture
