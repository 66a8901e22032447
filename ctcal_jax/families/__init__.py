"""Model families for the CTCAL step: what differs between SD 1.x/2.x (UNet, DDPM) and SD3
(MM-DiT, flow matching). Each module builds a `train_step.Family`."""
