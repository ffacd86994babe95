def greeting(name: str) -> str:
    return f"Salom, {name}!"
