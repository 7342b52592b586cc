# Optional: AWS IoT Core as the devices' broker. Each device is a thing with
# its own certificate; the policy is burrow's documented ACL: a device
# connects only as itself, reads only its request topic and writes only its
# presence and status; the pivot reads and writes every burrow topic.

data "aws_iot_endpoint" "mqtt" {
  count         = var.use_iot_core ? 1 : 0
  endpoint_type = "iot:Data-ATS"
}

data "aws_caller_identity" "me" {}

locals {
  iot_devices = var.use_iot_core ? toset(var.device_ids) : toset([])
  iot_arn     = "arn:aws:iot:${var.region}:${data.aws_caller_identity.me.account_id}"
}

resource "aws_iot_thing" "device" {
  for_each = local.iot_devices
  name     = each.key
}

resource "aws_iot_certificate" "device" {
  for_each = local.iot_devices
  active   = true
}

resource "aws_iot_thing_principal_attachment" "device" {
  for_each  = local.iot_devices
  thing     = aws_iot_thing.device[each.key].name
  principal = aws_iot_certificate.device[each.key].arn
}

resource "aws_iot_policy" "device" {
  count = var.use_iot_core ? 1 : 0
  name  = "${var.name}-device"
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect    = "Allow"
        Action    = "iot:Connect"
        Resource  = "${local.iot_arn}:client/$${iot:Connection.Thing.ThingName}"
        Condition = { Bool = { "iot:Connection.Thing.IsAttached" = "true" } }
      },
      {
        Effect   = "Allow"
        Action   = "iot:Subscribe"
        Resource = "${local.iot_arn}:topicfilter/burrow/devices/$${iot:Connection.Thing.ThingName}/request"
      },
      {
        Effect   = "Allow"
        Action   = "iot:Receive"
        Resource = "${local.iot_arn}:topic/burrow/devices/$${iot:Connection.Thing.ThingName}/request"
      },
      {
        Effect = "Allow"
        Action = "iot:Publish"
        Resource = [
          "${local.iot_arn}:topic/burrow/devices/$${iot:Connection.Thing.ThingName}/presence",
          "${local.iot_arn}:topic/burrow/devices/$${iot:Connection.Thing.ThingName}/status",
        ]
      },
    ]
  })
}

resource "aws_iot_policy_attachment" "device" {
  for_each = local.iot_devices
  policy   = aws_iot_policy.device[0].name
  target   = aws_iot_certificate.device[each.key].arn
}

# The pivot's own identity on IoT Core.
resource "aws_iot_certificate" "pivot" {
  count  = var.use_iot_core ? 1 : 0
  active = true
}

resource "aws_iot_policy" "pivot" {
  count = var.use_iot_core ? 1 : 0
  name  = "${var.name}-pivot"
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect = "Allow"
        Action = "iot:Connect"
        # The pivot's client id is burrow-pivot-<pivot_name>-<pid>.
        Resource = "${local.iot_arn}:client/burrow-pivot-*"
      },
      {
        Effect   = "Allow"
        Action   = ["iot:Subscribe"]
        Resource = "${local.iot_arn}:topicfilter/burrow/*"
      },
      {
        Effect   = "Allow"
        Action   = ["iot:Publish", "iot:Receive", "iot:RetainPublish"]
        Resource = "${local.iot_arn}:topic/burrow/*"
      },
    ]
  })
}

resource "aws_iot_policy_attachment" "pivot" {
  count  = var.use_iot_core ? 1 : 0
  policy = aws_iot_policy.pivot[0].name
  target = aws_iot_certificate.pivot[0].arn
}
