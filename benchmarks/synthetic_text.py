"""Text for the data benchmarks' synthetic conversations (data_throughput.py, data_scale.py): word and code pools,
no imports, so that a benchmark's measured processes load nothing more for them."""

EN = ("the model learns from examples and every answer should be short clear and correct while the data "
      "pipeline keeps whole turns together so that training never loses the end of a reply we measure "
      "throughput in tokens per second across many conversations with different lengths and languages "
      "please explain how attention works in a transformer and why the rotary embedding helps with long "
      "context windows as well as what happens when a sequence is truncated").split()
ZH = ("我们 今天 讨论 模型 训练 的 数据 处理 问题 。 请 解释 一下 注意力 机制 是 如何 工作 的 ， 以及 为什么 "
      "长 文本 需要 特别 的 位置 编码 。 这个 方法 在 实际 应用 中 非常 有效 ， 但是 也 有 一些 局限性 。 "
      "北京 上海 广州 深圳 的 天气 都 不错 ， 适合 出去 走走 。").split()
CODE = [
    "def {f}({a}, {b}):\n    return {a} * {b} + {n}\n",
    "for {a} in range({n}):\n    if {a} % 3 == 0:\n        print({a}, \"{f}\")\n",
    "class {F}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n\n    def {f}(self):\n        return self.{a}\n",
    "const {f} = ({a}, {b}) => {{ return {a}.map(x => x + {b}); }};\n",
    "SELECT {a}, COUNT(*) FROM {f} WHERE {b} > {n} GROUP BY {a};\n",
]
NAMES = ["alpha", "beta", "count", "total", "value", "items", "key", "node", "data", "result", "x_max"]


def draw_text(rng, pool: list[str], pool_len: list[int], tokens: int) -> str:
    """Sentences drawn from ``pool`` (their token counts in ``pool_len``) until about ``tokens`` tokens, at least one,
    joined by spaces."""
    parts, size = [], 0
    while size < tokens or not parts:
        k = rng.randrange(len(pool))
        parts.append(pool[k])
        size += pool_len[k] + 1
    return " ".join(parts)
