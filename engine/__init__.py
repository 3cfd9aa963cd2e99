if __name__ != "kubellm.engine":
    raise ImportError("engine/ is the package kubellm.engine; import it by that name")
X = 1
