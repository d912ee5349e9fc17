"""The notebook's own model classes and training functions: a test fixture, not library code.

Quoted verbatim from ../shared/reference/notebook.txt (cells In [4], [8], [17], [30], [55],
[60], [65], [68] for the models; In [3] and [69] for train/train_epoch/test and their multihead
forms), so that parity tests can compare torch_ref against the notebook's exact code.

The one change: in the training functions, `data.cuda(), target.cuda()` became
`data.to(FIXTURE_DEVICE), target.to(FIXTURE_DEVICE)`, so that the fixture stays on the CPU
(where the tests put the models) even on a machine with a GPU. The model classes contain no
`.cuda()` call and are unchanged. Do not edit the quoted code; re-quote it instead.
"""
# The notebook's imports (In [1]) that the quoted code uses; torchvision is not needed here.
import numpy as np
import torch
import torch.nn as nn

FIXTURE_DEVICE = torch.device("cpu")

# Keep pytest from collecting the notebook's test() functions if a test module imports them.
__test__ = False


# ---- notebook cell In [3]: train / train_epoch / test ----

def train(epochs, model, criterion, optimizer, train_loader, test_loader):
    for epoch in range(epochs):
        train_err = train_epoch(model, criterion, optimizer, train_loader)
        test_err = test(model, test_loader)
        print('Epoch {:03d}/{:03d}, Train Error {:.2f}% || Test Error {:.2f}%'.format(epoch, epochs, train_err*100, test_err*100))
    return train_err, test_err

def train_epoch(model, criterion, optimizer, loader):
    total_correct = 0.
    total_samples = 0.

    #model.train()
    for batch_idx, (data, target) in enumerate(loader):
        if torch.cuda.is_available():
            data, target = data.to(FIXTURE_DEVICE), target.to(FIXTURE_DEVICE)

        # insert code to feed the data to the model and collect its output
        output = model(data)

        # insert code to compute the loss from output and the true target
        loss = criterion(output, target)

        # insert code to update total_correct and total_samples
        # total_correct: total number of correctly classified samples
        # total_samples: total number of samples seen so far
        total_correct += (output.argmax(dim=1) == target).sum().item()
        total_samples += target.size(0)

        # insert code to update the parameters using optimizer
        # be careful in this part as an incorrect implementation will affect
        # all your experiments and have a significant impact on your grade!
        # in particular, note that pytorch does --not-- automatically
        # clear the parameter's gradients: check tutorials to see
        # how this can be done with a single method call.
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return 1 - total_correct/total_samples

def test(model, loader):
    total_correct = 0.
    total_samples = 0.
    model.eval()

    with torch.no_grad():
        for batch_idx, (data, target) in enumerate(loader):
            if torch.cuda.is_available():
                data, target = data.to(FIXTURE_DEVICE), target.to(FIXTURE_DEVICE)

            # insert code to feed the data to the model and collect its output
            output = model(data)

            # insert code to update total_correct and total_samples
            # total_correct: total number of correctly classified samples
            # total_samples: total number of samples seen so far
            total_correct += (output.argmax(dim=1) == target).sum().item()
            total_samples += target.size(0)

    return 1 - total_correct/total_samples


# ---- notebook cell In [4]: CNNtanh ----

class CNNtanh(nn.Module):
    def __init__(self, k):
        super(CNNtanh, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.Tanh())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.05)
                m.bias.data.zero_()

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [8]: CNNtanh_newinit ----

class CNNtanh_newinit(nn.Module):
    def __init__(self, k):
        super(CNNtanh_newinit, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.Tanh())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [17]: CNNelu ----

class CNNelu(nn.Module):
    def __init__(self, k):
        super(CNNelu, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.ELU())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [30]: CNNeluBN ----

class CNNeluBN(nn.Module):
    def __init__(self, k):
        super(CNNeluBN, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.BatchNorm2d(channel_out))
                layers_list.append(nn.ELU())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [55]: ResidualBlock, ResNet ----

class ResidualBlock(nn.Module):
    def __init__(self, channel_in, channel_out):
        super(ResidualBlock, self).__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(channel_out),
            nn.ELU()
        )

    def forward(self, x):
        return self.block(x) + x

class ResNet(nn.Module):
    def __init__(self, k):
        super(ResNet, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                if channel_in == channel_out:
                    layers_list.append(self.residual_block(channel_in, channel_out))
                else:
                    layers_list.append(self.basic_block(channel_in, channel_out))
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def basic_block(self, channel_in, channel_out):
        return nn.Sequential(
            nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(channel_out),
            nn.ELU()
        )

    def residual_block(self, channel_in, channel_out):
        return ResidualBlock(channel_in, channel_out)

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [60]: CNNtanhBN_oldinit ----

class CNNtanhBN_oldinit(nn.Module):
    def __init__(self, k):
        super(CNNtanhBN_oldinit, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.BatchNorm2d(channel_out))
                layers_list.append(nn.Tanh())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.05)
                m.bias.data.zero_()

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [65]: ResidualBlock_noBN, ResNet_noBN ----

class ResidualBlock_noBN(nn.Module):
    def __init__(self, channel_in, channel_out):
        super(ResidualBlock_noBN, self).__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1),
            nn.ELU()
        )

    def forward(self, x):
        return self.block(x) + x

class ResNet_noBN(nn.Module):
    def __init__(self, k):
        super(ResNet_noBN, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                if channel_in == channel_out:
                    layers_list.append(self.residual_block(channel_in, channel_out))
                else:
                    layers_list.append(self.basic_block(channel_in, channel_out))
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc = nn.Linear(channel_in*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def basic_block(self, channel_in, channel_out):
        return nn.Sequential(
            nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1),
            nn.ELU()
        )

    def residual_block(self, channel_in, channel_out):
        return ResidualBlock_noBN(channel_in, channel_out)

    def forward(self, input):

        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        for stage in self.conv_stages:
            x = stage(x)
        u = self.fc(x.view(x.size(0), -1))

        return u


# ---- notebook cell In [68]: CNNelu_multihead ----

class CNNelu_multihead(nn.Module):
    def __init__(self, k):
        super(CNNelu_multihead, self).__init__()

        # write code here to instantiate layers
        # for example, self.conv = nn.Conv2d(1, 4, 3, 1, 1)
        # creates a conv layer with 1 input channel, 4 output
        # channels, a 3x3 kernel, and stride=padding=1
        number_of_stages = 3
        layers_per_stage = k // number_of_stages

        self.conv_stages = nn.ModuleList()

        channel_in = 1
        channel_out = 4

        for _ in range(number_of_stages):
            layers_list = []
            for _ in range(layers_per_stage):
                layers_list.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, stride=1, padding=1))
                layers_list.append(nn.ELU())
                channel_in = channel_out
            layers_list.append(nn.AvgPool2d(kernel_size=2, stride=2))
            channel_out *= 2
            self.conv_stages.append(nn.Sequential(*layers_list))

        self.fc1 = nn.Linear(4*14*14, 10)
        self.fc2 = nn.Linear(8*7*7, 10)
        self.fc3 = nn.Linear(16*3*3, 10)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insert code to compute sigma
                sigma = np.sqrt(1 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
                m.weight.data.normal_(0, sigma)
                m.bias.data.zero_()

    def forward(self, input):
        # write code here to define how the output u is computed
        # from the input and the model's layers
        # for example, u = self.conv(input) defines u
        # to be simply the output of self.conv given 'input'
        x = input
        u1, u2, u3 = None, None, None
        for idx, stage in enumerate(self.conv_stages):
            x = stage(x)
            if idx == 0:
                u1 = self.fc1(x.view(x.size(0), -1))
            elif idx == 1:
                u2 = self.fc2(x.view(x.size(0), -1))
            else:
                u3 = self.fc3(x.view(x.size(0), -1))

        return u1, u2, u3


# ---- notebook cell In [69]: train_multihead / train_epoch_multihead / test_multihead ----

def train_multihead(epochs, model, criterion, optimizer, train_loader, test_loader):
    for epoch in range(epochs):
        train_err = train_epoch_multihead(model, criterion, optimizer, train_loader)
        test_err = test_multihead(model, test_loader)
        print('Epoch {:03d}/{:03d}, Train Error {:.2f}% || Test Error {:.2f}%'.format(epoch, epochs, train_err*100, test_err*100))
    return train_err, test_err

def train_epoch_multihead(model, criterion, optimizer, loader):
    total_correct = 0.
    total_samples = 0.

    model.train()
    for batch_idx, (data, target) in enumerate(loader):
        if torch.cuda.is_available():
            data, target = data.to(FIXTURE_DEVICE), target.to(FIXTURE_DEVICE)

        # insert code to feed the data to the model and collect its output
        output = model(data)

        # insert code to compute the loss from output and the true target
        loss1 = criterion(output[0], target)
        loss2 = criterion(output[1], target)
        loss3 = criterion(output[2], target)

        loss = (loss1 + loss2 + loss3) / 3

        # insert code to update total_correct and total_samples
        # total_correct: total number of correctly classified samples
        # total_samples: total number of samples seen so far
        total_correct += ((output[0].argmax(dim=1) == target).sum().item() + \
                            (output[1].argmax(dim=1) == target).sum().item() + \
                            (output[2].argmax(dim=1) == target).sum().item()) / 3
        total_samples += target.size(0)

        # insert code to update the parameters using optimizer
        # be careful in this part as an incorrect implementation will affect
        # all your experiments and have a significant impact on your grade!
        # in particular, note that pytorch does --not-- automatically
        # clear the parameter's gradients: check tutorials to see
        # how this can be done with a single method call.
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return 1 - total_correct/total_samples

def test_multihead(model, loader):
    total_correct = 0.
    total_samples = 0.
    model.eval()

    with torch.no_grad():
        for batch_idx, (data, target) in enumerate(loader):
            if torch.cuda.is_available():
                data, target = data.to(FIXTURE_DEVICE), target.to(FIXTURE_DEVICE)

            # insert code to feed the data to the model and collect its output
            output = model(data)

            # insert code to update total_correct and total_samples
            # total_correct: total number of correctly classified samples
            # total_samples: total number of samples seen so far
            total_correct += ((output[0].argmax(dim=1) == target).sum().item() + \
                            (output[1].argmax(dim=1) == target).sum().item() + \
                            (output[2].argmax(dim=1) == target).sum().item()) / 3
            total_samples += target.size(0)

    return 1 - total_correct/total_samples
