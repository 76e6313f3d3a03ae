"""The folder to list in ``nnUNet_extTrainer``: nnU-Net imports each plain module here as a
top-level module while it looks for a trainer, so the one module has a name no other package
uses (:mod:`lovasz_monai_nnunet_trainers`). Print the folder with ``lovasz-nnunet-folder``."""
