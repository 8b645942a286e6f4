import torch
import sidfast

teacher = torch.nn.Linear(16, 16).requires_grad_(False)      # pretrained teacher, frozen
fake_score = torch.nn.Linear(16, 16).requires_grad_(False)   # fake score, frozen in the generator step
generator = torch.nn.Linear(16, 16)                          # one-step generator
opt = torch.optim.Adam(generator.parameters(), lr=1e-5, betas=(0.0, 0.999))

def denoise(net, x, sigma):                                   # toy EDM-style D(x; sigma) -> x0 estimate
    return net(x / (1 + sigma ** 2).sqrt())

x_g = generator(2.5 * torch.randn(64, 16))                    # x_g = G(sigma_init * z), sigma_init = 2.5
sigma = sidfast.reference.generator_sigma(64).view(-1, 1)     # published generator noise levels
x_t = x_g + sigma * torch.randn_like(x_g)                     # EDM noising: a = 1, s = sigma
y_real = denoise(teacher, x_t, sigma)                         # f_phi(x_t)
y_fake = denoise(fake_score, x_t, sigma)                      # f_psi(x_t)
loss = sidfast.sid_generator_loss(y_real, y_fake, x_g, alpha=1.2)  # published loss.sum() / batch
opt.zero_grad()
(100.0 * loss).backward()                                     # published generator loss scale
opt.step()
print(f"SiD generator loss: {loss.item():.4f}")
