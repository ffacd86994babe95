VALUE = 1  # no Plugin subclass here
