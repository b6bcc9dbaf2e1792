# Hydra configs of icons. Installed as the package `icons.conf` (see pyproject.toml)
# so that `@hydra.main(config_path="pkg://icons.conf")` finds them.
