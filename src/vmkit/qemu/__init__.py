"""Adapter to QEMU: argv generation (pure), process launch/adoption, QMP, guest agent, qemu-img."""
