// The openai Node SDK against a running llmservice: prints one JSON object of what each call got.
// Usage: node client.mjs <base url of the server>
import OpenAI from "openai";

const client = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: "not-needed", maxRetries: 0 });
const messages = [{ role: "user", content: "What is the weather in Paris?" }];
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: {
      type: "object",
      properties: { city: { type: "string", enum: ["Paris", "Oslo"] } },
      required: ["city"],
      additionalProperties: false,
    },
  },
};
const named = { type: "function", function: { name: "get_weather" } };
const out = {};

const chat = await client.chat.completions.create({ model: "light", messages, max_tokens: 8 });
out.chat = { content: chat.choices[0].message.content, finish: chat.choices[0].finish_reason, usage: chat.usage };

let streamed = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: "light", messages, max_tokens: 8, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
out.stream = { content: streamed, usage };

const forced = await client.chat.completions.create({
  model: "light", messages, tools: [weather], tool_choice: named, max_tokens: 60,
});
out.tool = { finish: forced.choices[0].finish_reason, calls: forced.choices[0].message.tool_calls };

// The SDK's stream helper reassembles tool-call deltas into the final message.
const runner = client.chat.completions.stream({
  model: "light", messages, tools: [weather], tool_choice: "required", max_tokens: 60,
});
const final = await runner.finalChatCompletion();
out.tool_stream = { finish: final.choices[0].finish_reason, calls: final.choices[0].message.tool_calls };

const scored = await client.chat.completions.create({
  model: "light", messages, max_tokens: 3, logprobs: true, top_logprobs: 2,
});
out.logprobs = scored.choices[0].logprobs;

const response = await client.responses.create({ model: "light", input: "Say hello.", max_output_tokens: 8 });
out.response = { status: response.status, text: response.output_text, usage: response.usage };

console.log(JSON.stringify(out));
