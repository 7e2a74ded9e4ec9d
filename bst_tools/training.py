"""The optimizer recipe shared by scripts/train.py and the quality experiment (scripts/experiments/)."""

# The SSM parameters' learning rate as a multiple of the model's (docs/quality.md, "Recipe").
SSM_LEARNING_RATE_SCALE = 0.5


def optimizer_parameter_groups(model, weight_decay, learning_rate, ssm_learning_rate_scale):
    """AdamW parameter groups: matrices with weight decay; vectors (norms, biases) without; the parameters of every
    SSM sublayer (`BSTStateSpace`) without weight decay and at `ssm_learning_rate_scale` x the learning rate.

    S4 and Mamba train their SSMs this way: weight decay would pull the log step sizes and the state matrices toward
    zero, which means towards one fixed time scale, whatever the data asks for."""
    ssm_parameters = {
        id(parameter)
        for module in model.modules()
        if type(module).__name__ == "BSTStateSpace"
        for parameter in module.parameters()
    }
    groups = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": learning_rate},
        "ssm": {"params": [], "weight_decay": 0.0, "lr": learning_rate * ssm_learning_rate_scale},
    }
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in ssm_parameters:
            groups["ssm"]["params"].append(parameter)
        elif parameter.dim() >= 2:
            groups["decay"]["params"].append(parameter)
        else:
            groups["no_decay"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]
