"""The control plane: operators' federations, sessions, registry, groups, tiers and rollouts, and the device gateway."""
