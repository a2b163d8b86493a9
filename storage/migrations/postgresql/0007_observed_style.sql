-- 0007: the style each reply really has, read from its text (agent_core.style.measure_style),
-- beside the requested one in `style`. The policy learns from this one: the user reacts
-- to what they read. NULL for replies stored before it existed (then `style` stands in).
ALTER TABLE messages ADD COLUMN observed_style TEXT;
