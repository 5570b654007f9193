# ccbridge sandbox template for e2b: the Claude Code CLI preinstalled for the sandbox user, and
# ~/.claude ready (0700, owned by `user`) for the credentials the ccbridge sandbox service
# injects (~/.claude/.credentials.json 0600, ~/.claude.json, ~/.claude/settings.json).
# Build: see README.md (`e2b template build`). Nothing secret is baked into the image.
FROM e2bdev/code-interpreter:latest

USER root

# Claude Code needs Node.js 18+; install Node 20 only if the base image lacks a recent one.
RUN if ! command -v node >/dev/null 2>&1 || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 18 ]; then \
        apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
        && curl -fsSL https://deb.nodesource.com/setup_20.x | bash - \
        && apt-get install -y --no-install-recommends nodejs \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Set a version here for reproducible sandboxes (or keep `latest` and rebuild to upgrade).
ARG CLAUDE_CODE_VERSION=latest
RUN npm install -g --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
    && claude --version

# The CLI updates itself in the background by default; a sandbox should stay on the image's version.
ENV DISABLE_AUTOUPDATER=1

# The config dir the injector writes into: private to the sandbox user.
RUN install -d -m 0700 -o user -g user /home/user/.claude

USER user
WORKDIR /home/user
