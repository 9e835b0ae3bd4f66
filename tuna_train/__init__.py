"""tuna_train: data, packing, models, the training loop and the `tuna` CLI."""

import logging

# bitsandbytes (imported by peft) logs at import, on CPUs with AVX512-BF16, that it could not fetch an optional
# 4-bit CPU kernel from a model hub, then uses its own CPU code: every `tuna` command printed it, with advice to
# install a package that needs the hub. Only errors of that module are shown.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
