"""The HA decision core over the real cluster: cache, actions, environment and round loops."""
