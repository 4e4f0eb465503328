"""Where pretrained weights come from, and the errors that say what to do when they cannot be had."""
import json
from pathlib import Path

__all__ = ['HF_HUB_ORG', 'hub_id', 'PretrainedWeightsUnavailable', 'UnusableWeights', 'check_local_dir',
           'unavailable_message', 'weights_location', 'hub_errors']

#: The Hugging Face Hub organisation that hosts every timm-hpm weight.
HF_HUB_ORG = 'timm-hpm'


def hub_id(model_name_tag: str) -> str:
    """``'<org>/<model>.<tag>'``: where the weights of a registered ``model.tag`` live on the Hub."""
    return f'{HF_HUB_ORG}/{model_name_tag}'


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (not published yet, offline Hub, missing or corrupt file)."""


class UnusableWeights(PretrainedWeightsUnavailable):
    """Pretrained weights were found and read, but their content cannot be used (non-finite values, an HPM
    checkpoint without part of its head state); the message names the tensor or entries and says what to do."""


def check_local_dir(name: str) -> None:
    """A clear error for a ``local-dir:<folder>`` model whose config.json is missing or broken (timm reads it
    before any of this package's code runs, and would fail with a bare JSONDecodeError or KeyError)."""
    if not name.startswith('local-dir:'):
        return
    config = Path(name[len('local-dir:'):]) / 'config.json'
    try:
        architecture = json.loads(config.read_text()).get('architecture')
    except (OSError, ValueError, AttributeError) as error:
        raise PretrainedWeightsUnavailable(
            f'{config}: not a readable model config ({type(error).__name__}: {error}); a local-dir: folder holds '
            f'the config.json and model.safetensors that timm_hpm.hub.save_for_hub writes.') from None
    if not architecture:
        raise PretrainedWeightsUnavailable(f'{config} names no "architecture"; a local-dir: folder holds the '
                                           'config.json and model.safetensors that timm_hpm.hub.save_for_hub writes.')


def weights_location(cfg) -> str:
    """Where the weights of a resolved pretrained ``cfg`` are read from, in words."""
    if cfg.source == 'local-dir' or cfg.file:
        return f'the file {cfg.file!r}'
    if cfg.hf_hub_id:
        return f'the Hugging Face Hub repository {cfg.hf_hub_id!r}'
    return 'the state dict given as pretrained_cfg_overlay' if cfg.state_dict is not None else 'its weight location'


def unavailable_message(variant: str, cfg, error: BaseException) -> str:
    """Why the weights of ``variant`` (its resolved pretrained ``cfg``) could not be loaded, and what to do."""
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if cfg.source == 'local-dir' or cfg.file:
        empty = cfg.file and Path(cfg.file).is_file() and Path(cfg.file).stat().st_size == 0
        where = f'the file {cfg.file!r}' + (' (it is empty: 0 bytes; copy it again)' if empty else '')
    elif cfg.hf_hub_id:
        where = f'the Hugging Face Hub repository {cfg.hf_hub_id!r} (model.safetensors)'
    else:
        where = (f'anywhere: they are not published yet (planned: the Hugging Face Hub repository '
                 f'{hub_id(name)!r}; the README\'s model table says how to build them)')
    return (
        f'Could not load pretrained weights for {name!r} from {where}: {type(error).__name__}: {error}\n'
        f'timm-hpm weights are expected on the Hub under the organisation {HF_HUB_ORG!r}; if they are not '
        f'published or you are offline, load a local copy instead:\n'
        f"  timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='/path/model.safetensors'))\n"
        f"  timm.create_model('local-dir:/path/to/folder', pretrained=True)   # config.json + model.safetensors\n"
        f'or create it with pretrained=False.')


def hub_errors() -> tuple:
    """The exceptions that mean "the weights could not be had" (missing, unreachable, corrupt, refused)."""
    import pickle
    errors = [OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError]
    try:
        from huggingface_hub import errors as hub_error_types
        errors += [hub_error_types.HfHubHTTPError, hub_error_types.LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    try:
        import httpx
        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)
