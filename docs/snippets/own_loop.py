import tempfile

import torch
from sidfast.train import Distiller, TrainConfig


class Teacher(torch.nn.Module):                                # stands in for your pretrained EDM network
    image_shape = (1, 8, 8)                                    # one sample, C x H x W

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(65, 64)

    def forward(self, x, sigma, class_labels=None):           # D(x; sigma) -> x0 estimate
        s = sigma.reshape(-1, 1)
        h = torch.cat([x.flatten(1) / (1 + s ** 2).sqrt(), s.log()], 1)
        return (x.flatten(1) / (1 + s ** 2) + self.net(h)).view(x.shape)


config = TrainConfig(batch=16, lr=1e-4, device="cpu", run_dir=tempfile.mkdtemp(), progress=False)
distiller = Distiller(config, Teacher())                       # generator and fake score: copies of the teacher
while distiller.nimg < 160:                                    # your loop: your schedule, logging, evaluation
    loss_g, loss_fake = distiller.step()                       # fake-score update, generator update, EMA
print(f"{distiller.iteration} iterations, {distiller.nimg} images, loss_g {loss_g.item():.4f}")
distiller.save()                                               # checkpoint.pt: `sidfast distill --resume` continues
distiller.close()                                              # under torchrun: ends the process group it made
