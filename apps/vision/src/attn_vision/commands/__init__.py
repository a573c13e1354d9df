"""The subcommands of ``attn-vision``; each module has ``register(cli)`` and ``run(args)``."""
