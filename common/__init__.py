"""The shared base under every other package: typed configs, atomic files and manifests, checkpoint
folders, metrics logging, process-group set-up. It imports no other Loom package."""
